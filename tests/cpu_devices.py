"""XLA flags for emulated CPU devices, shared by the test session and its subprocesses."""


def xla_flags(device_count: int) -> str:
  # XLA:CPU aborts the process when a device thread waits over 40 s at a collective; on a
  # loaded 2-core machine emulated devices can fall that far apart without any fault. A
  # real deadlock still aborts (with XLA's report of the stuck collective), well before
  # the CI's own limit.
  return (f"--xla_force_host_platform_device_count={device_count}"
          " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
          " --xla_cpu_collective_call_terminate_timeout_seconds=900")
