"""Runs a script of tests/scripts in a fresh Python process with N fake CPU devices.

The device count is an XLA flag read once, when JAX starts, so each multi-device check runs in its
own process and the pytest process keeps its default single device.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"


def script_env(device_count: int, enable_x64: bool = False) -> dict[str, str]:
  """Returns the environment of a child process with `device_count` CPU devices."""
  env = dict(os.environ)
  # Level 0 skips LLVM's optimisations, which take most of the compile time of these tiny
  # models; the sharding passes that the tests check still run.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={device_count} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_ENABLE_X64"] = "1" if enable_x64 else "0"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
  return env


def script_command(script: str, *args: str) -> list[str]:
  return [sys.executable, str(SCRIPTS / script), *map(str, args)]


class ScriptRun:
  """A script started in the background; `finish` waits for it and checks its exit status."""

  def __init__(self, script: str, *args: str, device_count: int, enable_x64: bool = False):
    self.description = f"{script} {' '.join(map(str, args))} on {device_count} devices"
    self.process = subprocess.Popen(
        script_command(script, *args), env=script_env(device_count, enable_x64),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  def finish(self, timeout: float = 120) -> str:
    """Waits for the script and returns its stdout; fails the test if it failed."""
    try:
      stdout, stderr = self.process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      stdout, stderr = self.process.communicate()
      raise AssertionError(f"{self.description} timed out after {timeout} s.\n{stderr[-5000:]}")
    assert self.process.returncode == 0, (
        f"{self.description} exited with {self.process.returncode}.\n"
        f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}")
    return stdout


def run_script(script: str, *args: str, device_count: int, enable_x64: bool = False,
               timeout: float = 120) -> str:
  """Runs `tests/scripts/<script> args...` and returns its stdout; fails the test if it fails."""
  return ScriptRun(script, *args, device_count=device_count, enable_x64=enable_x64).finish(timeout)
