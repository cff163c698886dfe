"""Which acceleration QEMU can really use here: KVM, or TCG emulation.

``/dev/kvm`` existing is not enough.  Under some nested hypervisors KVM opens
and even runs real-mode code, yet a stock kernel hangs early in boot.  So we
boot the qube kernel itself under KVM with a timeout: without a root disk it
runs to "VFS: Unable to mount root fs" and panics, which with ``panic=-1``
and ``-no-reboot`` ends QEMU -- a few hundred milliseconds on working KVM.  If
it has not got there in time, KVM is not usable and we use TCG.

The verdict is cached (keyed by kernel, QEMU version and CPU model) because
the probe costs seconds when KVM is broken.  ``BULKHEAD_ACCEL=kvm|tcg``
overrides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 15.0
PROBE_MARKERS = (b"Unable to mount root", b"Kernel panic", b"Run /init")


@dataclass(frozen=True)
class Accel:
    name: str      # "kvm" or "tcg"
    reason: str    # one human sentence: why this one

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def host_tsc_khz() -> int:
    """The host TSC frequency in kHz: a TCG guest cannot calibrate its TSC reliably by itself."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0] if out.stdout else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "missing"


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> Accel:
    """Boot ``kernel`` under KVM; KVM is usable only if the kernel gets to mount its root."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm is missing or not accessible")
    cmd = [QEMU, "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "128",
           "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
           "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 reboot=t"]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    except OSError as e:
        return Accel("tcg", f"could not run {QEMU} for the KVM probe: {e}")
    seen = b""
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read(65536)
            if chunk:
                seen = (seen + chunk)[-65536:]
                if any(m in seen for m in PROBE_MARKERS):
                    took = time.monotonic() - start
                    return Accel("kvm", f"KVM booted a test kernel in {took:.1f} s")
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return Accel("tcg", f"KVM did not boot a test kernel within {timeout:.0f} s "
                        f"(last output: {tail[0][:80]!r}); using TCG emulation")


def detect(kernel: Path, cache_dir: Path) -> Accel:
    forced = os.environ.get("BULKHEAD_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"BULKHEAD_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
        return Accel(forced, "set by BULKHEAD_ACCEL")
    # Checked before the cache: after `modprobe kvm` the cached TCG verdict is stale.
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm is missing or not accessible")
    key = hashlib.sha256("\0".join([
        str(kernel.resolve()), str(kernel.stat().st_mtime_ns), qemu_version(), _cpu_model(),
    ]).encode()).hexdigest()[:16]
    cache = cache_dir / "accel.json"
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict) and cached.get("key") == key:
            return Accel(str(cached["name"]), str(cached["reason"]) + " (cached)")
    except (OSError, ValueError, KeyError):
        pass  # no cache, or a damaged one: probe again
    verdict = probe_kvm(kernel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, **asdict(verdict)}))
    os.replace(tmp, cache)
    return verdict
