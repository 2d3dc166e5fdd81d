"""The user-facing documents stay in step with the code they describe."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SOURCE_DIRS = ("langptune_jax", "configs", "bench", "tests", "tpu_scripts")


def _text_files():
  for folder in SOURCE_DIRS:
    for path in sorted((ROOT / folder).rglob("*")):
      if path.is_file() and path.suffix in (".py", ".sh", ".md", ".sbatch"):
        yield path


def test_no_reference_to_a_document_outside_the_repository():
  stale = "design" + " §"  # split so that this file does not match itself
  hits = [f"{p.relative_to(ROOT)}:{n}" for p in _text_files()
          for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
          if stale in line]
  assert not hits, f"cite docs/method.md sections instead: {hits}"


def test_readme_layout_names_every_module():
  readme = README.read_text(encoding="utf-8")
  modules = sorted(p.name for p in (ROOT / "langptune_jax").rglob("*.py")
                   if p.name != "__init__.py")
  missing = [m for m in modules if not re.search(rf"(?<![\w.]){re.escape(m)}", readme)]
  assert not missing, f"README.md's layout does not name: {missing}"


def test_readme_stays_a_short_guide():
  assert len(README.read_text(encoding="utf-8").splitlines()) < 260


def test_relative_links_of_the_documents_resolve():
  broken = []
  for doc in (README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
      if "://" not in target and not (doc.parent / target).exists():
        broken.append(f"{doc.relative_to(ROOT)} -> {target}")
  assert not broken, broken


def test_every_config_docstring_shows_its_command_line():
  for path in sorted((ROOT / "configs").glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert f"--config=configs/{path.name}" in doc, f"{path.name}: no command line in its docstring"
