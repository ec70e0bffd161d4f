"""`make cluster-demo`: a single-node SLURM cluster on this machine, the demo sweep through
`snakemake --executor slurm`, its verdicts checked against a local run, the daemons stopped.

Debian's slurm-wlm and munge run without systemd (notes/snakemake.md): munged as user munge with a random key,
slurmctld and slurmd as root from a generated slurm.conf (SLURM_CONF points every client at it) for localhost
with this machine's cores and memory. Everything lives under a state directory; only daemons started here
are stopped (by the pids they wrote), and munged only when this run started it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("slurm-wlm", "munge")


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def ensure_packages() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    print("[cluster] installing slurm-wlm and munge (Debian packages)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, stdout=subprocess.DEVNULL)


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(state: Path, host: str, cpus: int, mem_mb: int) -> str:
    """A slurm.conf for one node (this host), every file under `state`."""
    return "\n".join([
        "ClusterName=parity-both", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/d",
        f"SlurmctldPidFile={state}/slurmctld.pid", f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={state}/slurmctld.log", f"SlurmdLogFile={state}/slurmd.log",
        "SlurmctldPort=6817", "SlurmdPort=6818", "AuthType=auth/munge", "CryptoType=crypto/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2", "MinJobAge=600", "SchedulerType=sched/backfill",
        "SlurmctldTimeout=60", "SlurmdTimeout=60", "InactiveLimit=0", "KillWait=10",
        f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        f"PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
    ])


class Cluster:
    """Start/stop munged, slurmctld and slurmd; `env` is what clients (sbatch, squeue) need."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.host = socket.gethostname()
        self.conf = state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False

    def _munge(self) -> None:
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return  # a munged is already running: use it, leave it running
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge"), key.parent):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        _run(["runuser", "-u", "munge", "--", "munged", "--force"])
        self.started_munge = True
        _run(["sh", "-c", "munge -n | unmunge"])

    def start(self, cpus: int | None = None, mem_mb: int | None = None) -> float:
        t0 = time.monotonic()
        for d in ("ctld", "d"):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        cpus = cpus or os.cpu_count() or 1
        mem_mb = mem_mb or int(memory_mb() * 0.85)
        self.conf.write_text(slurm_conf(self.state, self.host, cpus, mem_mb))
        self._munge()
        _run(["slurmctld", "-f", str(self.conf)], env=self.env)
        _run(["slurmd", "-f", str(self.conf)], env=self.env)
        for _ in range(60):
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() in ("idle", "mixed", "allocated"):
                _run(["srun", "-N1", "hostname"], env=self.env, timeout=60)
                return time.monotonic() - t0
            time.sleep(1)
        raise RuntimeError(f"the SLURM node did not come up (sinfo: {out!r}); see {self.state}/slurm*.log")

    def stop(self) -> None:
        """SIGTERM to the daemons started here (by their pid files), then wait up to 20 s for them to exit."""
        pidfiles = [self.state / "slurmd.pid", self.state / "slurmctld.pid"]
        if self.started_munge:
            pidfiles.append(Path("/run/munge/munged.pid"))
        pids = []
        for pidfile in pidfiles:
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError, IndexError):
                pass
        deadline = time.monotonic() + 20
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def snakemake_cmd(out_dir: str, configfile: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
            "results_target", "--configfile", configfile, "--config", f"out_dir={out_dir}", *extra]


def verdicts(summary_path: Path) -> dict[str, str]:
    """model/lane/prompt -> 'status quantized=... graph=...' from a summary.json."""
    s = json.loads(summary_path.read_text())
    out = {}
    for model, m in s["models"].items():
        for lane, e in m["lanes"].items():
            for prompt, p in e["prompts"].items():
                out[f"{model}/{lane}/{prompt}"] = (f"{p['status']} quantized={p['quantized']['status']} "
                                                   f"graph={p['graph']['status']}")
    return out


def run_snakemake(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return time.monotonic() - t0


def cluster_demo(out: str, local_out: str, configfile: str, state: Path) -> dict[str, Any]:
    """Run the demo locally (if `local_out` has no summary) and through SLURM; compare their verdicts."""
    ensure_packages()
    logs = REPO / out
    logs.mkdir(parents=True, exist_ok=True)
    local_wall = None
    local_summary = REPO / local_out / "summary.json"
    if not local_summary.is_file():
        cmd = [a if a != "results_target" else f"{local_out}/summary.json"
               for a in snakemake_cmd(local_out, configfile, "--cores", "2")]
        local_wall = run_snakemake(cmd, os.environ.copy(), logs / "local-run.log")
    cluster = Cluster(state)
    try:
        startup = cluster.start()
        cmd = [a if a != "results_target" else f"{out}/summary.json"
               for a in snakemake_cmd(out, configfile, "--profile", str(REPO / "profiles" / "slurm"))]
        slurm_wall = run_snakemake(cmd, cluster.env, logs / "slurm-run.log")
        jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True,
                              env=cluster.env).stdout.split()
    finally:
        cluster.stop()
    local_v, slurm_v = verdicts(local_summary), verdicts(REPO / out / "summary.json")
    result = {"same_verdicts": local_v == slurm_v, "verdicts": slurm_v, "local_verdicts": local_v,
              "slurm_wall_s": round(slurm_wall, 1),
              "local_wall_s": None if local_wall is None else round(local_wall, 1),
              "cluster_startup_s": round(startup, 1), "slurm_jobs_seen_by_squeue": len(jobs)}
    (REPO / out / "cluster-demo.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results-cluster", help="out_dir of the SLURM run")
    ap.add_argument("--local-out", default="results", help="out_dir of the local run (make demo); run if missing")
    ap.add_argument("--configfile", default="config/demo.yaml")
    ap.add_argument("--state", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "parity-both-slurm"))
    a = ap.parse_args(argv)
    result = cluster_demo(a.out, a.local_out, a.configfile, Path(a.state))
    for k, v in sorted(result["verdicts"].items()):
        print(f"{k:50s} {v}" + ("" if result["local_verdicts"].get(k) == v else "   (local: differs)"))
    print(f"SLURM run {result['slurm_wall_s']} s (cluster start {result['cluster_startup_s']} s); "
          f"local run {result['local_wall_s'] if result['local_wall_s'] is not None else 'reused'} s; "
          f"verdicts {'equal' if result['same_verdicts'] else 'DIFFER'}")
    return 0 if result["same_verdicts"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
