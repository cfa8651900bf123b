#!/usr/bin/env python3
"""kiln's side-by-side benchmark harness: kiln vs Nix 2.8 (Debian's nix-bin) in the same run.

    bench/run.py formats            # NAR dump + SHA-256 of a ~1 GiB / ~20k-file tree
    bench/run.py all

Every measurement reports wall time and CPU time (user + sys of the child processes),
the best of N runs, because the machines are shared. Work happens on a tmpfs (or a path
given with --dir) so that the unjournalled root file system does not skew results.
Results print as Markdown rows ready for BENCHMARKS.md.
"""
import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kiln_bin():
    return os.path.join(ROOT, "target", "release", "kiln")


def build_kiln():
    subprocess.run(["cargo", "build", "--release", "-p", "kiln"], cwd=ROOT, check=True)


def measure(cmd, runs=3, stdout=subprocess.DEVNULL, env=None, shell=False, setup=None):
    """Best-of-N (wall, cpu) seconds of running cmd."""
    best = None
    for _ in range(runs):
        if setup:
            setup()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, stdout=stdout, env=env, shell=shell, check=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return best


def row(name, size, wall, cpu, ref=None):
    mibs = size / (1 << 20) / wall if size else 0
    ratio = f"{ref / wall:.2f}x" if ref else ""
    print(f"| {name} | {wall:.3f} s | {cpu:.3f} s | {mibs:,.0f} MiB/s | {ratio} |", flush=True)


def make_tree(path, total=1 << 30, files=20_000, seed=1):
    """~`total` bytes in `files` files of varied sizes, 100 per directory, some executables."""
    if os.path.exists(os.path.join(path, ".done")):
        return
    shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(seed)
    # Sizes: log-uniform-ish, scaled to the total.
    raw = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total / sum(raw)
    sizes = [max(0, int(r * scale)) for r in raw]
    block = os.urandom(1 << 20)
    for i, s in enumerate(sizes):
        d = os.path.join(path, f"d{i // 100:03d}")
        os.makedirs(d, exist_ok=True)
        f = os.path.join(d, f"f{i:05d}")
        with open(f, "wb") as fh:
            left = s
            off = rng.randrange(0, 1 << 19)
            while left > 0:
                n = min(left, len(block) - off)
                fh.write(block[off:off + n])
                left -= n
                off = 0
        if i % 17 == 0:
            os.chmod(f, 0o755)
    open(os.path.join(path, ".done"), "w").close()


def bench_formats(args):
    work = args.dir
    tree = os.path.join(work, "tree")
    print(f"## formats: NAR dump + SHA-256 of {tree}", flush=True)
    make_tree(tree)
    os.remove(os.path.join(tree, ".done"))
    nar = os.path.join(work, "tree.nar")
    with open(nar, "wb") as out:
        subprocess.run(["nix-store", "--dump", tree], stdout=out, check=True)
    size = os.path.getsize(nar)
    open(os.path.join(tree, ".done"), "w").close()
    os.remove(os.path.join(tree, ".done"))
    nfiles = sum(len(f) for _, _, f in os.walk(tree))
    print(f"tree: {nfiles} files, NAR {size / (1 << 20):.0f} MiB (page cache warm)\n")
    print("| what | wall | CPU | throughput | vs openssl |")
    print("|---|---|---|---|---|")
    # Warm the page cache.
    subprocess.run(["cat", nar], stdout=subprocess.DEVNULL, check=True)
    ref_wall, ref_cpu = measure(["openssl", "dgst", "-sha256", nar])
    row("openssl dgst -sha256 (NAR file)", size, ref_wall, ref_cpu)
    w, c = measure([kiln_bin(), "hash", "path", tree])
    row("kiln hash path (NAR + sha256)", size, w, c, None)
    print(f"|  kiln / openssl throughput | | | {ref_wall / w * 100:.0f}% | |")
    w2, c2 = measure(["nix-hash", "--type", "sha256", tree])
    row("nix-hash --type sha256 (Nix 2.8)", size, w2, c2, None)
    print(f"|  kiln vs Nix 2.8 | | | {w2 / w:.2f}x faster (wall), {c2 / c:.2f}x less CPU | |")
    w, c = measure([kiln_bin(), "nar", "dump", tree])
    row("kiln nar dump > /dev/null", size, w, c)
    w, c = measure(["nix-store", "--dump", tree])
    row("nix-store --dump > /dev/null (Nix 2.8)", size, w, c)
    os.remove(nar)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=["formats", "all"])
    p.add_argument("--dir", default="/tmp/kiln-bench", help="work directory (a tmpfs is mounted there if possible)")
    p.add_argument("--no-build", action="store_true")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if os.geteuid() == 0 and subprocess.run(["mountpoint", "-q", args.dir]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12g", "tmpfs", args.dir], check=True)
    if not args.no_build:
        build_kiln()
    print(f"machine: {os.cpu_count()} cores, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
          f"{time.strftime('%Y-%m-%d')}, nix {subprocess.run(['nix-store', '--version'], capture_output=True, text=True).stdout.strip()}\n")
    whats = set(args.what)
    if "all" in whats or "formats" in whats:
        bench_formats(args)


if __name__ == "__main__":
    sys.exit(main())
