#!/usr/bin/env python3
"""Adding `.drv` files with durability on and off: `nix-instantiate` of the 1,000-derivation
DAG of `run.py` (`dag_nix(20, 50, 3)`) through a daemon whose store is on a fresh 2 GiB
ext4 loop image; prints wall time and the daemon's CPU. Run as root:

    bench/durability.py target/release/kiln "kiln"
    EXTRA_CONF=$'fsync-store-paths = false\n' bench/durability.py target/release/kiln "kiln, no sync"
    bench/durability.py - "nix 2.8" --nix

(Nix's daemon forks per client, so its CPU is not seen here.)"""
import os
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench

kiln, label = sys.argv[1], sys.argv[2]
nix = "--nix" in sys.argv
img, mnt = os.environ.get("KILN_BENCH_IMG", "/var/tmp/kiln-durability.img"), "/mnt/kiln-durability"
os.makedirs(mnt, exist_ok=True)
subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
subprocess.run(["truncate", "-s", "0", img])
subprocess.run(["truncate", "-s", "2G", img], check=True)
subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
expr, names = bench.dag_nix(20, 50, 3)
d = mnt
for x in ["store", "state", "log", "conf"]:
    os.makedirs(f"{d}/{x}", exist_ok=True)
open(f"{d}/conf/nix.conf", "w").write("substituters =\nsandbox = false\nbuild-users-group =\n" + os.environ.get("EXTRA_CONF", ""))
open(f"{d}/dag.nix", "w").write(expr)
env = dict(os.environ, NIX_STORE_DIR=f"{d}/store", NIX_STATE_DIR=f"{d}/state", NIX_LOG_DIR=f"{d}/log", NIX_CONF_DIR=f"{d}/conf")
env.pop("NIX_PATH", None)
sock = f"{d}/sock"
if nix:
    denv = dict(env, NIX_REMOTE="local", NIX_DAEMON_SOCKET_PATH=sock)
    p = subprocess.Popen(["nix-daemon"], env=denv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
else:
    p = subprocess.Popen([kiln, "--store-dir", f"{d}/store", "--state-dir", f"{d}/state", "--log-dir", f"{d}/log", "--nix-conf", f"{d}/conf/nix.conf", "daemon", "--socket", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not os.path.exists(sock):
    time.sleep(0.01)
env["NIX_REMOTE"] = f"unix://{sock}"
subprocess.run(["sync"])
c0 = bench.proc_cpu(p.pid)
t = time.perf_counter()
r = subprocess.run(["nix-instantiate", f"{d}/dag.nix"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t
assert r.returncode == 0, r.stderr[-500:]
cpu = bench.proc_cpu(p.pid) - c0
p.terminate()
p.wait()
time.sleep(0.2)
subprocess.run(["umount", mnt])
print(f"{label}: instantiate {len(names)} drvs wall {wall:.3f} s, daemon CPU {cpu:.3f} s")
