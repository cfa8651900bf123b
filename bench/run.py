#!/usr/bin/env python3
"""kiln's side-by-side benchmark harness: kiln vs Nix 2.8 (Debian's nix-bin) in the same run.

    bench/run.py formats            # NAR dump + SHA-256 of a ~1 GiB / ~20k-file tree
    bench/run.py ca                 # the same workloads as floating content-addressed derivations
    bench/run.py sandbox            # sandboxed trivial builds (DAG and chain), and unshare(1)
    bench/run.py subst              # substituting ~300 paths / ~500 MiB from caches
    bench/run.py daemon             # kiln's daemon, Nix 2.8's and nix-daemon 2.34.8 (from the Debian
                                    # sid root of .ci/sid-root.sh) side by side: QueryPathInfo,
                                    # connections, and builds through each socket driven by the
                                    # Nix 2.34.8 client and by the Nix 2.8 client
    bench/run.py queries            # QueryPathInfo of distinct paths: 8 Nix 2.8 clients x 5
                                    # connections x 2,000 paths through each daemon
    bench/run.py guix               # kiln vs guix-daemon 1.5 (sid root), both driven by Guix
                                    # 1.5's client: a 300-deep chain and a 1,000-derivation DAG
    bench/run.py remote             # remote builds (`builders`): a kiln daemon offloading to kiln machines
                                    # through sshd on loopback (ssh-ng:// and ssh://), 1 GiB out and in,
                                    # and nix-daemon 2.34 offloading to the same machines
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
    # $KILN_BIN: a copy of the binary, so a long run is unaffected by rebuilds meanwhile.
    return os.environ.get("KILN_BIN") or os.path.join(ROOT, "target", "release", "kiln")


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
        r = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env, shell=shell)
        if r.returncode != 0:
            raise SystemExit(f"{cmd[0] if isinstance(cmd, list) else cmd} failed ({r.returncode}): {r.stderr.decode()[-1500:]}")
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


# What builders may use from the host when sandboxed (both sides get the same).
SANDBOX_PATHS = "/bin /usr /lib /lib64"


def nix_env(root, sandbox=False, features="nix-command"):
    """Environment for a private Nix 2.8 store rooted at `root` (no daemon, no substituters)."""
    conf = os.path.join(root, "conf")
    os.makedirs(conf, exist_ok=True)
    with open(os.path.join(conf, "nix.conf"), "w") as f:
        f.write(f"substituters =\nbuild-users-group =\nexperimental-features = {features}\n")
        f.write(f"sandbox = true\nsandbox-paths = {SANDBOX_PATHS}\n" if sandbox else "sandbox = false\n")
    env = dict(os.environ)
    env.update(NIX_STORE_DIR=os.path.join(root, "store"), NIX_STATE_DIR=os.path.join(root, "var"),
               NIX_LOG_DIR=os.path.join(root, "log"), NIX_CONF_DIR=conf, NIX_REMOTE="local")
    env.pop("NIX_PATH", None)
    return env


def kiln_store_args(root):
    return ["--store-dir", os.path.join(root, "store"), "--state-dir", os.path.join(root, "var"),
            "--log-dir", os.path.join(root, "log")]


def b32(n):
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    out = []
    for _ in range(32):
        out.append(alphabet[n % 32])
        n //= 32
    return "".join(out)


def make_paths(store_dir, n, refs_per_path, seed):
    """n store paths (tiny files) and a validity registration with references to earlier paths."""
    rng = random.Random(seed)
    os.makedirs(store_dir, exist_ok=True)
    paths = []
    lines = []
    nar_hash = None
    for i in range(n):
        p = f"{store_dir}/{b32(rng.getrandbits(160))}-p{i}"
        with open(p, "w") as f:
            f.write("x")
        paths.append(p)
    # NAR of a one-byte file "x": same for every path.
    import hashlib, struct
    def s(b):
        return struct.pack("<Q", len(b)) + b + b"\0" * ((8 - len(b) % 8) % 8)
    nar = s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"x") + s(b")")
    nar_hash = hashlib.sha256(nar).hexdigest()
    for i, p in enumerate(paths):
        refs = set()
        if i > 0:
            refs.add(paths[i - 1])  # a chain: the last path's closure is everything
            for _ in range(refs_per_path - 1):
                refs.add(paths[rng.randrange(max(0, i - 50), i)])
        lines.append(f"{p}\n{nar_hash}\n{len(nar)}\n\n{len(refs)}\n" + "".join(r + "\n" for r in sorted(refs)))
    return paths, "".join(lines)


def bench_store(args):
    work = os.path.join(args.dir, "store-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    print("## store: registration, closure, garbage collection\n", flush=True)
    print("| what | kiln wall | kiln CPU | Nix 2.8 wall | Nix 2.8 CPU | kiln faster (wall / CPU) |")
    print("|---|---|---|---|---|---|")

    def compare(name, kiln_cmd, nix_cmd, kiln_setup, nix_setup, runs=3, check=None):
        def run_one(cmd, env, setup, stdin_data):
            best = None
            for _ in range(runs):
                setup()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                r = subprocess.run(cmd, input=stdin_data, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                wall = time.perf_counter() - t
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if r.returncode != 0:
                    raise SystemExit(f"{cmd[0]} failed: {r.stderr.decode()[-2000:]}")
                if check:
                    check()
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                if best is None or wall < best[0]:
                    best = (wall, cpu)
            return best
        kw, kc = run_one(kiln_cmd[0], kiln_cmd[1], kiln_setup, kiln_cmd[2] if len(kiln_cmd) > 2 else None)
        nw, nc = run_one(nix_cmd[0], nix_cmd[1], nix_setup, nix_cmd[2] if len(nix_cmd) > 2 else None)
        print(f"| {name} | {kw:.3f} s | {kc:.3f} s | {nw:.3f} s | {nc:.3f} s | {nw / kw:.1f}x / {nc / kc:.1f}x |", flush=True)

    # 1. Register 10,000 paths with 5 references each (hashes given; both canonicalise).
    kroot, nroot = os.path.join(work, "k1"), os.path.join(work, "n1")
    _, reg = make_paths(os.path.join(work, "files1"), 10_000, 5, 1)
    reg_k = reg.replace(os.path.join(work, "files1"), os.path.join(kroot, "store")).encode()
    reg_n = reg.replace(os.path.join(work, "files1"), os.path.join(nroot, "store")).encode()
    nenv = nix_env(nroot)
    def fresh(root, text):
        def setup():
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(os.path.join(work, "files1"), os.path.join(root, "store"))
            if root == nroot:
                nix_env(nroot)
        return setup
    compare("register 10,000 paths × 5 refs (`register-validity --hash-given`)",
            ([kiln_bin(), *kiln_store_args(kroot), "store", "register-validity", "--hash-given"], None, reg_k),
            (["nix-store", "--register-validity", "--hash-given"], nenv, reg_n),
            fresh(kroot, reg_k), fresh(nroot, reg_n))

    # 2. Closure of a 100,000-path graph (the DB is written once by kiln; Nix reads the same file).
    root2 = os.path.join(work, "g")
    paths, reg2 = make_paths(os.path.join(root2, "store"), 100_000, 5, 2)
    r = subprocess.run([kiln_bin(), *kiln_store_args(root2), "store", "register-validity", "--hash-given"],
                       input=reg2.encode(), capture_output=True)
    assert r.returncode == 0, r.stderr
    env2 = nix_env(root2)
    top = paths[-1]
    compare("closure of 100,000 paths (`query -R` / `nix-store -qR`)",
            ([kiln_bin(), *kiln_store_args(root2), "store", "query", "-R", top], None),
            (["nix-store", "-qR", top], env2), lambda: None, lambda: None)

    # 3. GC of 10,000 dead paths: registered once (by kiln) at the directory the collectors
    # run in, saved, and restored to the same directory before every run (a store copied
    # elsewhere would name the wrong store directory).
    groot = os.path.join(work, "gc")
    saved = os.path.join(work, "gc-saved")
    _, reg3 = make_paths(os.path.join(groot, "store"), 10_000, 5, 3)
    r = subprocess.run([kiln_bin(), *kiln_store_args(groot), "store", "register-validity", "--hash-given"],
                       input=reg3.encode(), capture_output=True)
    assert r.returncode == 0, r.stderr
    shutil.copytree(groot, saved, symlinks=True)
    def gc_setup():
        shutil.rmtree(groot, ignore_errors=True)
        shutil.copytree(saved, groot, symlinks=True)
    def check_collected():
        left = [n for n in os.listdir(os.path.join(groot, "store")) if not n.startswith(".")]
        assert not left, f"{len(left)} paths survived the collection"
    compare("GC of 10,000 dead paths (`store gc` / `nix-store --gc`)",
            ([kiln_bin(), *kiln_store_args(groot), "store", "gc"], None),
            (["nix-store", "--gc"], nix_env(groot)), gc_setup, gc_setup, check=check_collected)
    shutil.rmtree(work, ignore_errors=True)


def dag_nix(n_layers, width, deps):
    """A Nix expression for a layered DAG of trivial derivations; each refers to `deps`
    derivations of the previous layer (so outputs carry references)."""
    lines = ["let sys = builtins.currentSystem;",
             "mk = name: deps: derivation { inherit name; system = sys; builder = \"/bin/sh\";",
             "  args = [ \"-c\" (\"echo \" + builtins.concatStringsSep \" \" (map toString deps) + \" > $out\") ]; };"]
    names = []
    for l in range(n_layers):
        for i in range(width):
            name = f"n{l}x{i}"
            d = [] if l == 0 else [f"n{l - 1}x{(i * 7 + k * 13) % width}" for k in range(deps)]
            lines.append(f"{name} = mk \"{name}\" [ {' '.join(d)} ];")
            names.append(name)
    body = "\n".join(lines[3:])
    return "\n".join(lines[:3]) + "\nin rec {\n" + body + "\n}\n", names


def content_addressed(expr):
    """The same expression with every derivation floating content-addressed."""
    ca = '__contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; '
    return expr.replace("derivation { ", "derivation { " + ca)


def bench_ca(args):
    print("## content-addressed derivations: kiln build vs nix-store --realise (ca-derivations, sandbox off)\n", flush=True)
    b = DrvBench(args, "ca-bench", sandbox=False, features="nix-command ca-derivations")
    print(f"max-jobs {b.jobs} on both sides; every derivation floating content-addressed, so each one with inputs is resolved (a second .drv written) and each output moved to its content-addressed path\n")
    b.header()
    expr, names = dag_nix(10, 100, 2)
    drvs = b.prepare(content_addressed(expr), names)
    b.run_pair("1,000 floating CA derivations (DAG, 10 layers × 100)", drvs, 1000)
    b.restore()
    subprocess.run(b.kiln_cmd("build", "--no-out-link", "-Q", "-j", b.jobs, *drvs), check=True, capture_output=True)
    b.run_pair("no-op rebuild of the 1,000 (all realised)", drvs, 1000, setup=lambda: None)
    expr, names = chain_nix(300)
    drvs = b.prepare(content_addressed(expr), names)
    b.run_pair("300-deep chain of floating CA derivations", drvs, 300)
    shutil.rmtree(b.work, ignore_errors=True)


def chain_nix(n):
    lines = ["let sys = builtins.currentSystem;",
             "mk = name: dep: derivation { inherit name; system = sys; builder = \"/bin/sh\"; args = [ \"-c\" \"echo ${dep} > $out\" ]; };",
             "in rec {", "c0 = derivation { name = \"c0\"; system = sys; builder = \"/bin/sh\"; args = [ \"-c\" \"echo 0 > $out\" ]; };"]
    for i in range(1, n):
        lines.append(f"c{i} = mk \"c{i}\" c{i - 1};")
    lines.append("}")
    return "\n".join(lines) + "\n", [f"c{n - 1}"]


class DrvBench:
    """The same .drv files (instantiated once by Nix 2.8) realised by kiln and by Nix from
    the same saved store, with the sandbox on or off on both sides."""

    def __init__(self, args, name, sandbox, features="nix-command"):
        self.args = args
        self.features = features
        self.work = os.path.join(args.dir, name)
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.root = os.path.join(self.work, "s")
        self.saved = os.path.join(self.work, "saved")
        self.jobs = str(args.jobs)
        self.sandbox = sandbox
        self.env = None

    def kiln_cmd(self, *rest):
        sb = (["--option", "sandbox", "true", "--option", "sandbox-fallback", "false",
               "--option", "sandbox-paths", SANDBOX_PATHS.replace("/lib64", "/lib64?")]
              if self.sandbox else ["--option", "sandbox", "false"])
        return [kiln_bin(), *kiln_store_args(self.root), *sb, "--option", "gc-runtime-roots", "false", *rest]

    def prepare(self, expr, attrs):
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.saved, ignore_errors=True)
        self.env = nix_env(self.root, self.sandbox, self.features)
        if DAEMON_SANDBOX and self.sandbox:
            with open(os.path.join(self.root, "conf", "nix.conf"), "a") as c:
                c.write("build-users-group = nixbld\n")
        f = os.path.join(self.work, "e.nix")
        open(f, "w").write(expr)
        drvs = []
        for chunk in [attrs[i:i + 200] for i in range(0, len(attrs), 200)]:
            a = []
            for x in chunk:
                a += ["-A", x]
            r = subprocess.run(["nix-instantiate", f, *a], env=self.env, capture_output=True, text=True, check=True)
            drvs += r.stdout.split()
        shutil.copytree(self.root, self.saved, symlinks=True)
        return drvs

    def restore(self):
        subprocess.run(["chmod", "-R", "u+w", self.root], check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.saved, self.root, symlinks=True)

    def run_pair(self, name, drvs, per, setup=None, runs=3):
        setup = setup or self.restore
        kcmd = self.kiln_cmd("build", "--no-out-link", "-Q", "-j", self.jobs, *drvs)
        # kiln's state dir is Nix's (NIX_STATE_DIR = root/var): both use the same database.
        ncmd = ["nix-store", "--realise", "--max-jobs", self.jobs, *drvs]
        kw, kc = measure(kcmd, runs=runs, setup=setup)
        nw, nc = measure(ncmd, runs=runs, env=self.env, setup=setup)
        print(f"| {name} | {kw:.3f} s ({kw / per * 1000:.1f} ms each) | {kc:.3f} s | {nw:.3f} s ({nw / per * 1000:.1f} ms each) | {nc:.3f} s | {nw / kw:.1f}x / {nc / kc:.1f}x |", flush=True)
        if self.args.fs == "ext4":
            # kiln syncs a path's contents before it becomes valid (Nix 2.8 never does): show
            # what that costs by also running without it.
            fw, fc = measure(kcmd[:1] + ["--option", "fsync-store-paths", "false"] + kcmd[1:], runs=runs, setup=setup)
            print(f"| ↳ kiln with fsync-store-paths = false | {fw:.3f} s ({fw / per * 1000:.1f} ms each) | {fc:.3f} s | | | {nw / fw:.1f}x / {nc / fc:.1f}x |", flush=True)
        return kw, nw

    @staticmethod
    def header():
        print("| workload | kiln wall | kiln CPU | Nix 2.8 wall | Nix 2.8 CPU | kiln faster (wall / CPU) |")
        print("|---|---|---|---|---|---|")


def bench_build(args):
    print("## build engine: kiln build vs nix-store --realise (sandbox off, same .drv files)\n", flush=True)
    b = DrvBench(args, "build-bench", sandbox=False)
    work, jobs = b.work, b.jobs
    print(f"max-jobs {jobs} on both sides\n")
    b.header()
    expr, names = dag_nix(10, 100, 2)
    drvs = b.prepare(expr, names)
    b.run_pair("1,000 trivial derivations (DAG, 10 layers × 100)", drvs, 1000)
    # No-op: everything valid (built once, then realised again).
    b.restore()
    subprocess.run(b.kiln_cmd("build", "--no-out-link", "-Q", "-j", jobs, *drvs), check=True, capture_output=True)
    b.run_pair("no-op rebuild of the 1,000 (all valid)", drvs, 1000, setup=lambda: None)
    expr, names = chain_nix(300)
    drvs = b.prepare(expr, names)
    b.run_pair("300-deep chain", drvs, 300)
    # A ~1 GiB output in ~20,000 files (copied from a tree in the page cache). The builder
    # notes when its copy starts and ends, so each run's engine time is its wall time minus
    # its own builder's time (the copy alone varies by tens of percent between runs here).
    tree = os.path.join(args.dir, "tree")
    make_tree(tree)
    stamps = os.path.join(work, "stamps")
    expr = ("derivation { name = \"big\"; system = builtins.currentSystem; builder = \"/bin/sh\"; "
            f"args = [ \"-c\" \"/bin/date +%s.%N >> {stamps}; /bin/cp -r {tree} $out; /bin/date +%s.%N >> {stamps}\" ]; }}\n")
    drvs = b.prepare("{ big = " + expr + "; }", ["big"])

    def engine_time(cmd, env=None, runs=3):
        best = None
        for _ in range(runs):
            b.restore()
            open(stamps, "w").close()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(f"{cmd[0]} failed: {r.stderr.decode()[-1500:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            t0, t1 = (float(x) for x in open(stamps).read().split())
            engine = wall - (t1 - t0)
            if best is None or engine < best[0]:
                best = (engine, wall, cpu)
        return best

    ke, kw, kc = engine_time(b.kiln_cmd("build", "--no-out-link", "-Q", *drvs))
    ne, nw, nc = engine_time(["nix-store", "--realise", *drvs], env=b.env)
    print(f"| ~1 GiB output in ~20k files (builder: cp -r) | {kw:.3f} s | {kc:.3f} s | {nw:.3f} s | {nc:.3f} s | {nw / kw:.1f}x / {nc / kc:.1f}x |")
    print(f"\nTime added to the builder's own (wall minus the builder's copy, best of 3): kiln {ke:.3f} s, "
          f"Nix 2.8 {ne:.3f} s: kiln adds {ke / ne * 100:.0f}% of Nix's time.\n", flush=True)
    shutil.rmtree(work, ignore_errors=True)


def bench_sandbox(args):
    print("## sandbox: kiln build vs nix-store --realise, both with sandbox = true (same .drv files)\n", flush=True)
    b = DrvBench(args, "sandbox-bench", sandbox=True)
    print(f"max-jobs {b.jobs} on both sides; builders see {SANDBOX_PATHS} read-only\n")
    b.header()
    expr, names = dag_nix(10, 100, 2)
    drvs = b.prepare(expr, names)
    b.run_pair("1,000 trivial derivations (DAG, 10 layers × 100), sandboxed", drvs, 1000)
    expr, names = chain_nix(300)
    drvs = b.prepare(expr, names)
    b.run_pair("300-deep chain, sandboxed", drvs, 300)
    # The floor: unshare(1) creating the same namespaces around /bin/true, one after another.
    n = 300
    cmd = "for i in $(seq %d); do unshare --user --map-root-user --mount --pid --fork --ipc --uts --net /bin/true; done" % n
    w, c = measure(cmd, shell=True)
    print(f"\nunshare(1) with user, mount, PID, IPC, UTS and network namespaces around /bin/true, {n} times: "
          f"{w / n * 1000:.2f} ms wall, {c / n * 1000:.2f} ms CPU each.\n", flush=True)
    shutil.rmtree(b.work, ignore_errors=True)


def bench_client():
    return os.environ.get("KILN_BENCH_CLIENT") or os.path.join(ROOT, "target", "release", "examples", "bench_client")


def floor_server():
    return os.path.join(os.path.dirname(bench_client()), "floor_server")


def proc_cpu(pid):
    """CPU seconds of a process and its reaped children (Nix's daemon forks per client)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in f[11:15]) / tick


# Nix 2.34.8 from a Debian sid root (`.ci/sid-root.sh`), run on this machine without a chroot
# through the root's own loader and libraries.
SID_ROOT = os.environ.get("KILN_SID_ROOT", "/var/tmp/sid-root")


def sid_cmd(program):
    """`program` (nix-store, nix-daemon, ...) of the sid root, as a command to run here."""
    return [os.path.join(SID_ROOT, "lib64", "ld-linux-x86-64.so.2"), "--library-path",
            f"{SID_ROOT}/usr/lib/x86_64-linux-gnu:{SID_ROOT}/lib/x86_64-linux-gnu",
            "--argv0", program, os.path.join(SID_ROOT, "usr", "bin", program)]


def sid_nix_version():
    """The sid root's Nix version ("2.34.8"), or None if there is no root with Nix."""
    if not all(os.path.exists(os.path.join(SID_ROOT, p))
               for p in ["lib64/ld-linux-x86-64.so.2", "usr/bin/nix-daemon", "usr/bin/nix-store"]):
        return None
    r = subprocess.run(sid_cmd("nix-store") + ["--version"], capture_output=True, text=True)
    return r.stdout.split()[-1] if r.returncode == 0 and r.stdout.strip() else None


def private_home(env, root):
    """`env` with HOME (and so Nix's user configuration, cache and state directories)
    inside `root`, so no Nix reads or writes the invoking user's."""
    env = {k: v for k, v in env.items() if not k.startswith("XDG_") and k != "NIX_CONFIG"}
    env["HOME"] = os.path.join(root, "home")
    return env


def machine_busy():
    """Busy CPU seconds of the whole machine so far, all cores (/proc/stat: user, nice,
    system, irq, softirq)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf("SC_CLK_TCK")


def proc_children(pid):
    """The child processes of all of a process's threads, zombies included."""
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += open(f"/proc/{pid}/task/{t}/children").read().split()
        except OSError:
            pass
    return out


class Daemon:
    """One daemon serving the store at `root` on its own socket: "kiln" (kiln daemon),
    "nix" (Nix 2.8's nix-daemon, Debian bookworm's nix-bin on the host) or "nix234"
    (nix-daemon 2.34.8 from the sid root)."""

    def __init__(self, kind, root, env):
        self.kind = kind
        self.socket = os.path.join(root, f"{kind}.sock")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kind == "nix":
            self.p = subprocess.Popen(["nix-daemon"], env=dict(env, NIX_REMOTE="local", NIX_DAEMON_SOCKET_PATH=self.socket), **quiet)
        elif kind == "nix234":
            # Run through the sid root's loader, /proc/self/exe is the loader, so nix-daemon
            # 2.34 cannot start itself again as its build hook ("while reading the response
            # from the build hook" on every build); with no remote builders it needs none.
            e = dict(env, NIX_REMOTE="local", NIX_DAEMON_SOCKET_PATH=self.socket, NIX_CONFIG="build-hook =")
            self.p = subprocess.Popen(sid_cmd("nix-daemon"), env=e, **quiet)
        else:
            sb = (["--option", "sandbox", "true", "--option", "sandbox-fallback", "false",
                   "--option", "sandbox-paths", SANDBOX_PATHS.replace("/lib64", "/lib64?")]
                  if DAEMON_SANDBOX else ["--option", "sandbox", "false"])
            self.p = subprocess.Popen([kiln_bin(), *kiln_store_args(root), "--nix-conf", os.path.join(root, "conf", "nix.conf"),
                                       *sb, "--option", "gc-runtime-roots", "false",
                                       "daemon", "--socket", self.socket], **quiet)
        t = time.time()
        while not os.path.exists(self.socket):
            if self.p.poll() is not None:
                raise SystemExit(f"{kind} daemon exited ({self.p.returncode}) before making its socket")
            if time.time() - t > 30:
                self.stop()
                raise SystemExit(f"{kind} daemon did not start")
            time.sleep(0.01)
        self.env = dict(env, NIX_REMOTE=f"unix://{self.socket}")

    def cpu(self):
        return proc_cpu(self.p.pid)

    def settled_cpu(self):
        """CPU once the children of finished connections have exited and been reaped (a
        Nix worker with a large heap takes a while to exit; its CPU counts only then)."""
        t = time.time()
        while proc_children(self.p.pid) and time.time() - t < 300:
            time.sleep(0.02)
        last = self.cpu()
        for _ in range(50):
            time.sleep(0.1)
            now = self.cpu()
            if now == last:
                break
            last = now
        return last

    def stop(self):
        self.p.terminate()
        self.p.wait()
        if os.path.exists(self.socket):  # Nix's daemons leave theirs
            os.unlink(self.socket)


# `--daemon-sandbox`: the daemons build sandboxed, with the build users of group nixbld.
DAEMON_SANDBOX = False


def fmt_ms(s, n):
    ms = s / n * 1000
    return f"{ms:.1f} ms" if ms >= 1 else f"{ms * 1000:.0f} µs"


def bench_daemon(args):
    sid = sid_nix_version()
    kinds = ["kiln", "nix"] + (["nix234"] if sid else [])
    if args.daemon_kinds:
        kinds = [k for k in kinds if k in args.daemon_kinds.split(",")]
    label = {"kiln": "kiln", "nix": "Nix 2.8 daemon", "nix234": f"nix-daemon {sid}"}
    runs = args.runs
    print(f"## daemon: kiln daemon vs nix-daemon (Nix 2.8){f' vs nix-daemon {sid}' if sid else ''}, same store, same clients\n", flush=True)
    if not sid:
        print(f"**nix-daemon 2.34 column and Nix 2.34 client skipped**: no Debian sid root with Nix at {SID_ROOT} "
              f"(make it with .ci/sid-root.sh, or set KILN_SID_ROOT)\n", flush=True)
    print(f"kiln: {kiln_bin()}; Nix 2.8: {subprocess.run(['nix-daemon', '--version'], capture_output=True, text=True).stdout.strip()}"
          f"{f'; Nix 2.34: nix-daemon {sid} from {SID_ROOT} (run through its loader, build-hook empty)' if sid else ''}; "
          f"best of {runs} runs, daemons interleaved within each run; "
          f"{'sandbox on with build users' if args.daemon_sandbox else 'sandbox off'}, no substituters, "
          f"a fresh copy of the store for every daemon start\n", flush=True)
    global DAEMON_SANDBOX
    DAEMON_SANDBOX = args.daemon_sandbox
    if args.daemon_builds_only:
        return daemon_builds(args, sid, kinds, label, runs)
    if not os.environ.get("KILN_BENCH_CLIENT"):
        subprocess.run(["cargo", "build", "--release", "-p", "kiln-protocol", "--example", "bench_client",
                        "--example", "floor_server"], cwd=ROOT, check=True, capture_output=True)
    work = os.path.join(args.dir, "daemon-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    root = os.path.join(work, "s")
    saved = os.path.join(work, "saved")
    env = private_home(nix_env(root), root)
    subprocess.run(["nix-store", "--init"], env=env, check=True)
    f = os.path.join(work, "file.txt")
    open(f, "w").write("hello\n")
    path = subprocess.run(["nix-store", "--add", f], env=env, check=True, capture_output=True, text=True).stdout.strip()
    shutil.copytree(root, saved, symlinks=True)
    sd = env["NIX_STORE_DIR"]
    conns, per = 8, 25_000

    def fresh():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(saved, root, symlinks=True)

    def query(socket, cpu_of, timeout=None):
        c0 = cpu_of()
        r = subprocess.run([bench_client(), socket, sd, "query", path, str(conns), str(per)], capture_output=True, text=True,
                           check=True, timeout=timeout)
        n, secs = r.stdout.split()
        return int(n) / float(secs), (cpu_of() - c0) / int(n) * 1e6

    qs = {k: [] for k in kinds}  # (queries/s, daemon µs per query) per run
    cs = {k: [] for k in kinds}  # (connections/s, daemon ms per connection) per run
    floors = []
    floor_broken = None
    for run in range(runs):
        for kind in kinds[run % len(kinds):] + kinds[:run % len(kinds)]:
            fresh()
            d = Daemon(kind, root, env)
            try:
                if kind == "kiln" and not floor_broken:
                    # The kernel's floor: a server that answers with the same bytes and does
                    # nothing else, a thread per connection, measured in the same run.
                    fsock = os.path.join(root, "floor.sock")
                    fp = subprocess.Popen([floor_server(), fsock, d.socket, sd, path])
                    while not os.path.exists(fsock):
                        time.sleep(0.01)
                    try:
                        floors.append(query(fsock, lambda: (time.sleep(0.2), proc_cpu(fp.pid))[1], timeout=60))
                    except subprocess.TimeoutExpired:
                        # 200,000 round trips take seconds; a minute means a stuck handshake.
                        floor_broken = ("floor_server did not answer bench_client within 60 s (a stuck handshake: "
                                        "at protocol 1.38 it waits for the client's CPU-affinity word before sending "
                                        "its feature list, while the client waits for that list); floor not measured")
                        print(f"**{floor_broken}**\n", flush=True)
                    fp.terminate()
                    fp.wait()
                qs[kind].append(query(d.socket, d.settled_cpu))
                c0 = d.settled_cpu()
                r = subprocess.run([bench_client(), d.socket, sd, "connect", path, "8", "500"], capture_output=True, text=True, check=True)
                n, secs = r.stdout.split()
                cs[kind].append((int(n) / float(secs), (d.settled_cpu() - c0) / int(n) * 1e3))
            finally:
                d.stop()
    bq = {k: min(qs[k], key=lambda q: q[1]) for k in kinds}
    bqr = {k: max(q[0] for q in qs[k]) for k in kinds}
    bc = {k: max(cs[k], key=lambda c: c[0]) for k in kinds}
    floor = min(floors, key=lambda q: q[1]) if floors else None
    others = kinds[1:]
    print("| measure | " + " | ".join(label[k] for k in kinds) + " | " + " | ".join(f"kiln vs {label[k]}" for k in others) + " |")
    print("|---" * (1 + len(kinds) + len(others)) + "|")

    def line(name, vals, better):
        cells = [v[0] for v in vals]
        ratios = [better(vals[0][1], v[1]) for v in vals[1:]]
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |", flush=True)

    line(f"QueryPathInfo over {conns} connections: queries/s (best)",
         [(f"{bqr[k]:,.0f}", bqr[k]) for k in kinds], lambda a, b: a / b)
    line("QueryPathInfo: daemon CPU per query (best)",
         [(f"{bq[k][1]:.2f} µs", bq[k][1]) for k in kinds], lambda a, b: b / a)
    if floor:
        print(f"| QueryPathInfo: the same from a server doing nothing but the socket round trip (floor) | {floor[1]:.2f} µs "
              f"(kiln {bq['kiln'][1] / floor[1]:.2f}x of it) | " + " | ".join(f"{bq[k][1] / floor[1]:.1f}x the floor" for k in others)
              + " |" + " |" * len(others))
    line("new connections/s (handshake + one IsValidPath, 8 clients, best)",
         [(f"{bc[k][0]:,.0f}", bc[k][0]) for k in kinds], lambda a, b: a / b)
    line("daemon CPU per connection (of the best run)",
         [(f"{bc[k][1]:.3f} ms", bc[k][1]) for k in kinds], lambda a, b: b / a)
    print(f"\nRanges over the {runs} runs: " + "; ".join(
        f"{label[k]}: {min(q[0] for q in qs[k]):,.0f}–{max(q[0] for q in qs[k]):,.0f} queries/s, "
        f"{min(q[1] for q in qs[k]):.2f}–{max(q[1] for q in qs[k]):.2f} µs/query, "
        f"{min(c[0] for c in cs[k]):,.0f}–{max(c[0] for c in cs[k]):,.0f} connections/s, "
        f"{min(c[1] for c in cs[k]):.3f}–{max(c[1] for c in cs[k]):.3f} ms/connection" for k in kinds)
        + (f"; floor {min(q[1] for q in floors):.2f}–{max(q[1] for q in floors):.2f} µs/query." if floors else
           f". Floor: {floor_broken}."), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    daemon_builds(args, sid, kinds, label, runs)


def daemon_builds(args, sid, kinds, label, runs):
    # The build-engine workloads through each daemon's socket, the same .drv files
    # (instantiated once by Nix 2.8) in a fresh copy of the same store for every daemon start.
    clients = []
    for c in args.daemon_clients.split(","):
        if c == "2.34":
            if sid:
                clients.append((f"Nix {sid} client (`nix-store --realise` from {SID_ROOT})", sid_cmd("nix-store")))
        elif c == "2.8":
            clients.append(("Nix 2.8 client (`nix-store --realise` from Debian's nix-bin)", ["nix-store"]))
        else:
            raise SystemExit(f"--daemon-clients: unknown client {c!r} (2.34, 2.8)")
    for client_label, client in clients:
        socket_builds(args, client_label, client, kinds, label, runs)


def proc_cpu_split(pid):
    """(user, system) CPU seconds of a process and its reaped children."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[13])) / tick, (int(f[12]) + int(f[14])) / tick


def bench_queries(args):
    """`QueryPathInfo` of distinct paths, as real clients ask: 8 Nix 2.8 clients at once,
    each running `nix-store -q --references` of all 2,000 paths of a store 5 times (a new
    connection each time, every path asked once per connection: the client caches what it
    was told, and no per-connection cache of the daemon's answers a second time): 80,000
    queries. Reports the daemon's CPU (user and system) per query."""
    sid = sid_nix_version()
    kinds = ["kiln", "nix"] + (["nix234"] if sid else [])
    label = {"kiln": "kiln", "nix": "Nix 2.8 daemon", "nix234": f"nix-daemon {sid}"}
    runs = args.runs
    n, conns, rounds = 2000, 8, 5
    print(f"## queries: `QueryPathInfo` of distinct paths through each daemon ({conns} Nix 2.8 clients × {rounds} "
          f"connections each × {n:,} distinct paths = {conns * rounds * n:,} queries; best of {runs}, interleaved)\n", flush=True)
    work = os.path.join(args.dir, "queries-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    root, saved = os.path.join(work, "s"), os.path.join(work, "saved")
    env = private_home(nix_env(root), root)
    subprocess.run(["nix-store", "--init"], env=env, check=True)
    paths, reg = make_paths(os.path.join(root, "store"), n, 5, 11)
    subprocess.run(["nix-store", "--register-validity", "--hash-given"], input=reg.encode(), env=env, check=True)
    shutil.copytree(root, saved, symlinks=True)
    listing = os.path.join(work, "paths")
    open(listing, "w").write(" ".join(paths))
    script = f"for i in $(seq {rounds}); do nix-store -q --references $(cat {listing}) > /dev/null || exit 1; done"
    res = {k: [] for k in kinds}  # (wall, user µs/query, sys µs/query)
    for run in range(runs):
        for kind in kinds[run % len(kinds):] + kinds[:run % len(kinds)]:
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(saved, root, symlinks=True)
            d = Daemon(kind, root, env)
            try:
                d.settled_cpu()
                u0, s0 = proc_cpu_split(d.p.pid)
                t = time.perf_counter()
                procs = [subprocess.Popen(["sh", "-c", script], env=d.env, stderr=subprocess.PIPE) for _ in range(conns)]
                for pr in procs:
                    _, err = pr.communicate()
                    if pr.returncode != 0:
                        raise SystemExit(f"a client of {kind} failed: {err.decode()[-2000:]}")
                wall = time.perf_counter() - t
                d.settled_cpu()
                u1, s1 = proc_cpu_split(d.p.pid)
                q = conns * rounds * n
                res[kind].append((wall, (u1 - u0) / q * 1e6, (s1 - s0) / q * 1e6))
            finally:
                d.stop()
    # User and system time are not shown apart: on machines whose kernel samples them at
    # each tick (no VIRT_CPU_ACCOUNTING), a daemon that sleeps between short requests gets
    # all of it booked to one or the other.
    print("| daemon | daemon CPU per query (best) | range over the runs | wall of the best |")
    print("|---|---|---|---|")
    for k in kinds:
        best = min(res[k], key=lambda r: r[1] + r[2])
        tot = [r[1] + r[2] for r in res[k]]
        print(f"| {label[k]} | **{best[1] + best[2]:.2f} µs** | "
              f"{min(tot):.2f}–{max(tot):.2f} µs | {best[0]:.2f} s |", flush=True)
    kb = min(r[1] + r[2] for r in res["kiln"])
    print("\n" + "; ".join(f"{label[k]} / kiln: {min(r[1] + r[2] for r in res[k]) / kb:.1f}x" for k in kinds[1:]) + "\n", flush=True)
    shutil.rmtree(work, ignore_errors=True)


def bench_guix(args):
    """kiln (guix layout) against guix-daemon 1.5 from the Debian sid root, both driven by
    Guix 1.5's own client library (`bench/guix-graph.scm` through `guix repl` in the root):
    a 300-deep chain and a 1,000-derivation DAG, their `.drv` files added through the daemon,
    then one `build-derivations` of all. Sandbox off and no build users on both sides
    (guix-daemon runs in the root, a chroot, with `--disable-chroot`); max-jobs 2; a fresh
    store per run at the same path, bind-mounted into the root for the client."""
    root = SID_ROOT
    if not os.path.exists(os.path.join(root, "usr/bin/guix-daemon")) or os.geteuid() != 0:
        print(f"## guix: skipped (needs root and a sid root with Guix 1.5 at {root})\n", flush=True)
        return
    runs = args.runs
    work = os.path.join(args.dir, "guix-bench")
    print(f"## guix: kiln (guix layout) vs guix-daemon 1.5, both driven by Guix 1.5's client "
          f"(best of {runs}, interleaved; {args.fs} at {args.dir})\n", flush=True)
    workloads = [("300-deep chain", "chain", 300), ("1,000-derivation DAG", "dag", 1000)]
    kinds = ["guix", "kiln"]
    res = {(w[0], k): [] for w in workloads for k in kinds}  # (add, build, daemon cpu)
    for run in range(runs):
        for name, kind, n in workloads:
            for k in kinds[run % 2:] + kinds[:run % 2]:
                subprocess.run(["chmod", "-R", "u+w", work], stderr=subprocess.DEVNULL)
                shutil.rmtree(work, ignore_errors=True)
                os.makedirs(os.path.join(work, "store"))
                shutil.copy(os.path.join(ROOT, "bench", "guix-graph.scm"), work)
                shutil.copy("/bin/dash", os.path.join(work, "sh"))
                sock = os.path.join(work, "socket")
                mnt = os.path.join(root, work.lstrip("/"))
                os.makedirs(mnt, exist_ok=True)
                subprocess.run(["mount", "--bind", work, mnt], check=True)
                # Its own session, so that guix-daemon's per-client processes go with it.
                quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                # guix-daemon keeps its database in the root's /var/guix whatever
                # NIX_STATE_DIR says: a fresh one per run, over it.
                var_guix = os.path.join(root, "var", "guix")
                state = os.path.join(work, "state")
                os.makedirs(state)
                if k == "guix":
                    subprocess.run(["mount", "--bind", state, var_guix], check=True)
                try:
                    if k == "guix":
                        d = subprocess.Popen(["chroot", root, "env", f"NIX_STORE_DIR={work}/store",
                                              f"NIX_STATE_DIR={work}/state", f"NIX_LOG_DIR={work}/log",
                                              "guix-daemon", "--disable-chroot", "--build-users-group=",
                                              f"--listen={sock}", "--no-substitutes", "--max-jobs=2"], **quiet)
                    else:
                        d = subprocess.Popen([kiln_bin(), "--layout", "guix", "--store-dir", f"{work}/store",
                                              "--state-dir", f"{work}/state", "--log-dir", f"{work}/log",
                                              "--option", "sandbox", "false", "--option", "build-users-group", "",
                                              "--option", "substitute", "false", "--option", "max-jobs", "2",
                                              "daemon", "--socket", sock], **quiet)
                    t = time.time()
                    while not os.path.exists(sock):
                        if d.poll() is not None or time.time() - t > 30:
                            raise SystemExit(f"{k} daemon did not start")
                        time.sleep(0.01)
                    c0 = proc_cpu(d.pid)
                    r = subprocess.run(["chroot", root, "env", f"NIX_STORE_DIR={work}/store", f"GUIX_DAEMON_SOCKET={sock}",
                                        "HOME=/tmp", f"BENCH_SH={work}/sh", f"BENCH_KIND={kind}", f"BENCH_N={n}",
                                        "guix", "repl", "--", f"{work}/guix-graph.scm"],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        raise SystemExit(f"{k}, {name}: guix repl failed: {r.stderr[-3000:]}")
                    last = r.stdout.strip().splitlines()[-1].split()
                    time.sleep(0.3)  # guix-daemon's per-client process is reaped
                    res[(name, k)].append((float(last[1]), float(last[3]), proc_cpu(d.pid) - c0))
                finally:
                    try:
                        os.killpg(d.pid, 15)
                    except ProcessLookupError:
                        pass
                    d.wait()
                    # Lazily: a client process of guix-daemon's may still be exiting.
                    subprocess.run(["umount", "-l", mnt])
                    if k == "guix":
                        subprocess.run(["umount", "-l", var_guix])
    print("| workload | guix-daemon 1.5: add + build = total (daemon CPU) | kiln: add + build = total (daemon CPU) | kiln faster (total) |")
    print("|---|---|---|---|")
    for name, _, n in workloads:
        cells = []
        best = {}
        for k in kinds:
            b = min(res[(name, k)], key=lambda x: x[0] + x[1])
            best[k] = b[0] + b[1]
            cells.append(f"{b[0]:.2f} + {b[1]:.2f} = **{b[0] + b[1]:.2f} s** ({b[2]:.2f} s)")
        print(f"| {name} | {cells[0]} | {cells[1]} | {best['guix'] / best['kiln']:.1f}x |", flush=True)
    print("\nAll runs (add + build): " + "; ".join(
        f"{k} {name}: " + ", ".join(f"{a:.2f}+{b:.2f}" for a, b, _ in res[(name, k)])
        for name, _, _ in workloads for k in kinds) + "\n", flush=True)
    subprocess.run(["chmod", "-R", "u+w", work], stderr=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)


def socket_builds(args, client_label, client, kinds, label, runs):
    b = DrvBench(args, "daemon-build-bench", sandbox=DAEMON_SANDBOX)
    jobs = b.jobs
    others = kinds[1:]
    if DAEMON_SANDBOX:
        print("\n**Sandbox on in every daemon, builds as the build users of group nixbld.**")
    print(f"\nBuilds through the socket, {client_label} with `--max-jobs {jobs}` against each daemon "
          f"(best of {runs}, interleaved; CPU = client + daemon + builders; a fresh daemon on a fresh copy of the store per run):\n")
    print("| workload | " + " | ".join(f"{label[k]}: wall / CPU (per derivation)" for k in kinds) + " | "
          + " | ".join(f"kiln faster than {label[k]} (wall / CPU)" for k in others) + " |")
    print("|---" * (1 + len(kinds) + len(others)) + "|", flush=True)
    ranges = []

    def one(kind, drvs, outputs, built=None):
        """One realisation through a fresh daemon: (wall, cpu, CPU used meanwhile by
        processes other than the client, the daemon and its builders)."""
        if built:
            subprocess.run(["chmod", "-R", "u+w", b.root], check=False)
            shutil.rmtree(b.root, ignore_errors=True)
            shutil.copytree(built, b.root, symlinks=True)
        else:
            b.restore()
        d = Daemon(kind, b.root, private_home(b.env, b.root))
        try:
            c0 = d.cpu()
            m0 = machine_busy()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            r = subprocess.run([*client, "--realise", "--max-jobs", jobs, *drvs], env=d.env, capture_output=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if r.returncode != 0:
                raise SystemExit(f"{label[kind]} with {client_label}: {r.stderr.decode()[-1500:]}")
            if len(r.stdout.split()) != outputs:
                raise SystemExit(f"{label[kind]} with {client_label}: {len(r.stdout.split())} output paths, expected {outputs}")
            cpu = d.settled_cpu() - c0 + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            other = max(0.0, machine_busy() - m0 - cpu)
        finally:
            d.stop()
        return wall, cpu, other

    def workload(name, drvs, outputs, per_n, built=None, keep=None):
        res = {k: [] for k in kinds}
        for run in range(runs):
            for kind in kinds[run % len(kinds):] + kinds[:run % len(kinds)]:
                res[kind].append(one(kind, drvs, outputs, built[kind] if built else None))
                if keep is not None and run == runs - 1:
                    # This daemon's own store with every output valid, for the no-op.
                    keep[kind] = os.path.join(b.work, f"built-{kind}")
                    shutil.rmtree(keep[kind], ignore_errors=True)
                    shutil.copytree(b.root, keep[kind], symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
        best = {k: min(res[k]) for k in kinds}
        kw, kc, _ = best["kiln"]
        print(f"| {name} | " + " | ".join(f"{best[k][0]:.3f} s / {best[k][1]:.3f} s ({fmt_ms(best[k][0], per_n)} each)" for k in kinds)
              + " | " + " | ".join(f"{best[k][0] / kw:.1f}x / {best[k][1] / kc:.1f}x" for k in others) + " |", flush=True)
        ranges.append(f"{name}: " + "; ".join(
            f"{label[k]} {min(r[0] for r in res[k]):.3f}–{max(r[0] for r in res[k]):.3f} s wall, "
            f"{min(r[1] for r in res[k]):.3f}–{max(r[1] for r in res[k]):.3f} s CPU "
            f"(other processes meanwhile: {best[k][2]:.1f} s of CPU in the best run, at most {max(r[2] for r in res[k]):.1f} s)"
            for k in kinds))

    expr, names = dag_nix(10, 100, 2)
    drvs = b.prepare(expr, names)
    built = {}
    workload("1,000 trivial derivations (DAG, 10 layers × 100)", drvs, 1000, 1000, keep=built)
    workload("no-op re-realise of the 1,000 (all outputs valid)", drvs, 1000, 1000, built=built)
    expr, names = chain_nix(300)
    drvs = b.prepare(expr, names)
    workload("300-deep chain", drvs, 1, 300)
    print(f"\nRanges over the {runs} runs (wall, CPU):\n" + "".join(f"* {r}\n" for r in ranges), flush=True)
    shutil.rmtree(b.work, ignore_errors=True)


def make_substitution_sources(src, n=300, per_path=1_700_000, files=6, seed=7):
    """n directories of compressible text-like data (~per_path bytes each, in `files` files)."""
    if os.path.exists(os.path.join(src, ".done")):
        return sorted(os.path.join(src, d) for d in os.listdir(src) if d.startswith("item"))
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 11)))
             for _ in range(20_000)]
    base = " ".join(rng.choice(vocab) for _ in range(900_000)).encode()  # ~6 MiB of "words"
    dirs = []
    for i in range(n):
        d = os.path.join(src, f"item{i:03}")
        os.makedirs(d, exist_ok=True)
        for j in range(files):
            size = per_path // files
            off = rng.randrange(0, len(base) - size)
            with open(os.path.join(d, f"f{j}"), "wb") as f:
                f.write(f"item {i} file {j}\n".encode() + base[off:off + size])
        dirs.append(d)
    open(os.path.join(src, ".done"), "w").close()
    return dirs


def bench_subst(args):
    """Substituting ~300 paths / ~500 MiB from a local cache (xz, zstd) and from `kiln serve`
    on loopback: kiln copy --from vs nix copy --from, each into a fresh store."""
    work = os.path.join(args.dir, "subst-bench")
    os.makedirs(work, exist_ok=True)
    logical = os.path.join(work, "L", "store")
    src_root = os.path.join(work, "src-root")
    kiln = kiln_bin()
    karg = ["--store-dir", logical]
    def kiln_at(root):
        return [kiln] + karg + ["--root", root, "--state-dir", os.path.join(root, "var"),
                                "--log-dir", os.path.join(root, "log"), "--option", "gc-runtime-roots", "false"]
    dirs = make_substitution_sources(os.path.join(work, "data"))
    # The source store (kiln's, under a root) and the caches it writes.
    paths_file = os.path.join(work, "paths")
    if not os.path.exists(paths_file):
        shutil.rmtree(src_root, ignore_errors=True)
        out = subprocess.run(kiln_at(src_root) + ["store", "add"] + dirs, check=True,
                             capture_output=True, text=True).stdout.split()
        with open(paths_file, "w") as f:
            f.write("\n".join(out))
    paths = open(paths_file).read().split()
    key = os.path.join(work, "sk")
    if not os.path.exists(key):
        subprocess.run(kiln_at(src_root) + ["key", "generate", "bench-1", "--secret-key-file", key,
                                            "--public-key-file", key + ".pub"], check=True)
    pk = open(key + ".pub").read().strip()
    caches = {}
    for comp in ["xz", "zstd"]:
        d = os.path.join(work, f"cache-{comp}")
        if not os.path.exists(os.path.join(d, ".done")):
            shutil.rmtree(d, ignore_errors=True)
            subprocess.run(kiln_at(src_root) + ["copy", "--to", f"file://{d}", "--compression", comp,
                                                "--secret-key-file", key] + paths, check=True)
            open(os.path.join(d, ".done"), "w").close()
        caches[comp] = d
    nar_bytes = 0
    for p in paths:
        hp = os.path.basename(p)[:32]
        for line in open(os.path.join(caches["xz"], hp + ".narinfo")):
            if line.startswith("NarSize: "):
                nar_bytes += int(line.split()[1])
    print(f"\n### Substitution: {len(paths)} paths, {nar_bytes / (1 << 20):.0f} MiB of NAR\n")
    print("| what | wall | CPU | NAR MiB/s | vs Nix |\n|---|---|---|---|---|")
    # The machine's own rate: decompress + SHA-256, two streams at once.
    for comp, tool in [("xz", "xz"), ("zstd", "zstd")]:
        files = sorted(os.path.join(caches[comp], "nar", f) for f in os.listdir(os.path.join(caches[comp], "nar")))
        half = len(files) // 2
        lists = [files[:half], files[half:]]
        script = " & ".join(f"cat {' '.join(l)} | {tool} -dc | sha256sum >/dev/null" for l in lists) + " & wait"
        w, c = measure(script, shell=True)
        row(f"{tool} -dc piped to sha256sum, 2 streams (machine rate)", nar_bytes, w, c)
    nix_env_ = nix_env(os.path.join(work, "L"))
    def fresh_nix():
        subprocess.run(["chmod", "-R", "u+w", os.path.join(work, "L")], stderr=subprocess.DEVNULL)
        for d in ["store", "var", "log"]:
            shutil.rmtree(os.path.join(work, "L", d), ignore_errors=True)
    kroot = os.path.join(work, "kiln-root")
    def fresh_kiln():
        subprocess.run(["chmod", "-R", "u+w", kroot], stderr=subprocess.DEVNULL)
        shutil.rmtree(kroot, ignore_errors=True)
    sources = [(comp, f"file://{caches[comp]}") for comp in ["xz", "zstd"]]
    server = subprocess.Popen(kiln_at(src_root) + ["serve", "--listen", "127.0.0.1:0", "--secret-key-file", key],
                              stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    served = [w for w in line.split() if w.startswith("http://")][0].rstrip("/")
    sources.append(("kiln serve (none, loopback)", served))
    try:
        for name, url in sources:
            nw, nc = measure(["nix", "copy", "--from", url, "--option", "trusted-public-keys", pk] + paths,
                             env=nix_env_, setup=fresh_nix)
            kw, kc = measure(kiln_at(kroot) + ["--option", "trusted-public-keys", pk, "copy", "--from", url] + paths,
                             setup=fresh_kiln)
            row(f"nix copy --from {name}", nar_bytes, nw, nc)
            row(f"kiln copy --from {name}", nar_bytes, kw, kc, ref=nw)
    finally:
        server.kill()

# ---- remote builds (`builders`) ------------------------------------------------------

class Sshd:
    """An sshd on a free loopback port that lets a key made for the run log in as root, as
    crates/kiln/tests/remote_builder.rs sets it up."""

    def __init__(self, d):
        import base64, socket
        os.makedirs("/run/sshd", exist_ok=True)
        os.makedirs(d, exist_ok=True)
        for k in ["hostkey", "clientkey"]:
            for f in [k, k + ".pub"]:
                if os.path.exists(os.path.join(d, f)):
                    os.unlink(os.path.join(d, f))
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, k)], check=True)
        shutil.copy(os.path.join(d, "clientkey.pub"), os.path.join(d, "authorized_keys"))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        conf = os.path.join(d, "sshd_config")
        with open(conf, "w") as f:
            f.write(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n"
                    f"PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
                    f"PidFile {d}/sshd.pid\n")
        self.p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", conf, "-E", os.path.join(d, "sshd.log")],
                                  preexec_fn=_CG["remote"].join if "remote" in _CG else None)
        t = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.p.poll() is not None or time.time() - t > 20:
                    raise SystemExit(f"sshd did not start (see {d}/sshd.log)")
                time.sleep(0.02)
        self.key = os.path.join(d, "clientkey")
        self.host_key = base64.b64encode(open(os.path.join(d, "hostkey.pub")).read().strip().encode()).decode()
        # For clients other than kiln (ssh itself, Nix's nix copy): the port, the key, no host check.
        self.opts = f"-p {self.port} -i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

    def cpu(self):
        """sshd's CPU with that of its sessions, the programs they run and everything those start."""
        return _CG["remote"].cpu()

    def wait_idle(self, timeout=60):
        """Waits until every session, and all it started, has ended."""
        t = time.time()
        while proc_children(self.p.pid):
            if time.time() - t > timeout:
                return False
            time.sleep(0.02)
        return _CG["remote"].wait_empty(keep=(str(self.p.pid),), timeout=max(1, timeout - (time.time() - t)))

    def stop(self):
        self.p.terminate()
        self.p.wait()


def proc_cpu_split(pid):
    """(own, reaped children's) CPU seconds of a process, from /proc/PID/stat."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick


def proc_comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


class CpuGroup:
    """A cpuacct cgroup (v1 at /sys/fs/cgroup/cpuacct, or v2 at /sys/fs/cgroup or
    /sys/fs/cgroup/unified): the CPU of every process started in it and of all their
    descendants, also those that outlive their parents (ssh's session processes do, so
    /proc's reaped-children figures miss them)."""

    def __init__(self, name):
        self.path = None
        for base, usage in [("/sys/fs/cgroup/cpuacct", "cpuacct.usage"), ("/sys/fs/cgroup/unified", "cpu.stat"),
                            ("/sys/fs/cgroup", "cpu.stat")]:
            if not os.path.exists(os.path.join(base, "cgroup.procs")):
                continue
            p = os.path.join(base, name)
            try:
                os.makedirs(p, exist_ok=True)
            except OSError:
                continue
            if os.path.exists(os.path.join(p, usage)):
                self.path, self.usage = p, usage
                break
            try:
                os.rmdir(p)
            except OSError:
                pass

    def join(self):
        """For preexec_fn: the child (and what it starts) counts here."""
        if self.path:
            with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def cpu(self):
        if not self.path:
            return 0.0
        text = open(os.path.join(self.path, self.usage)).read()
        if self.usage == "cpuacct.usage":
            return int(text) / 1e9
        return int(text.split("usage_usec")[1].split()[0]) / 1e6

    def pids(self):
        if not self.path:
            return []
        return open(os.path.join(self.path, "cgroup.procs")).read().split()

    def wait_empty(self, keep=(), timeout=60):
        """Waits until only `keep` (pids) are left in the group; True if so."""
        t = time.time()
        while [p for p in self.pids() if p not in keep]:
            if time.time() - t > timeout:
                return False
            time.sleep(0.02)
        return True

    def remove(self):
        if self.path:
            try:
                os.rmdir(self.path)
            except OSError as e:
                print(f"(could not remove the cgroup {self.path}: {e})", flush=True)


# The cgroups of the remote section: the local daemon (with its builders and ssh clients),
# sshd (with its sessions, the machines' kiln processes and their builders), the client.
_CG = {}


class KilnMachine:
    """A kiln build machine reached through the run's sshd, with its own store at `root`.

    mode "ns" (the default): the remote program runs kiln in its own mount namespace with
    `root/store` bind-mounted over the shared logical store directory (as the remote-builder
    test runs its Nix 2.8 machine), so builds run with the sandbox off, as everywhere else.
    mode "root": `kiln --root ROOT` with the sandbox on, as the test runs its kiln machine
    (kiln refuses to build with the sandbox off when the store's files are not at the
    logical path)."""

    def __init__(self, work, name, logical, mode="ns"):
        self.root = os.path.join(work, name)
        self.logical = logical
        self.conf = os.path.join(work, f"{name}.nix.conf")
        with open(self.conf, "w") as f:
            f.write("substituters =\nbuild-users-group =\nbuilders =\nmax-jobs = 1\n"
                    + ("sandbox = false\n" if mode == "ns" else ""))
        kiln = kiln_bin()
        if mode == "ns":
            common = (f"{kiln} --store-dir {logical} --state-dir {self.root}/var --log-dir {self.root}/log "
                      f"--nix-conf {self.conf} --option gc-runtime-roots false")
            wrap = lambda cmd: (f"exec unshare -m --propagation private sh -c "
                                f"'mount --bind {self.root}/store {logical} && exec {common} {cmd}'\n")
        else:
            common = (f"{kiln} --root {self.root} --store-dir {logical} --nix-conf {self.conf} "
                      f"--option gc-runtime-roots false --option sandbox true --option sandbox-fallback false "
                      f"--option sandbox-paths '/bin /usr /lib /lib64?'")
            wrap = lambda cmd: f"exec {common} {cmd}\n"
        self.serve = os.path.join(work, f"{name}-serve")
        self.stdio = os.path.join(work, f"{name}-daemon")
        with open(self.serve, "w") as f:
            # Run as 'PROGRAM --serve --write' for ssh:// machines.
            f.write("#!/bin/sh\n" + wrap("store serve --write"))
        with open(self.stdio, "w") as f:
            # Run as 'PROGRAM --stdio' for ssh-ng:// machines.
            f.write("#!/bin/sh\n" + wrap("daemon --stdio"))
        for p in [self.serve, self.stdio]:
            os.chmod(p, 0o755)
        self.fresh()

    def fresh(self):
        """An empty store, as a machine that has never built anything."""
        subprocess.run(["chmod", "-R", "u+w", self.root], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(os.path.join(self.root, "store"), exist_ok=True)

    def program(self, transport):
        return self.stdio if transport == "ssh-ng" else self.serve

    def entry(self, sshd, transport, jobs=1, speed=1):
        """Its machines-file line: URI systems sshkey maxjobs speedfactor features mandatory hostkey."""
        return (f"{transport}://root@127.0.0.1?remote-program={self.program(transport)} x86_64-linux "
                f"{sshd.key} {jobs} {speed} - - {sshd.host_key}")

    def holds(self, base):
        """Whether `base` (a store path's base name) is in this machine's store on disk."""
        if os.path.exists(os.path.join(self.root, "store", base)):
            return True
        return os.path.exists(os.path.join(self.root, self.logical.lstrip("/"), base))


class KilnRemoteDaemon(Daemon):
    """A kiln daemon on the store at `root` with `max-jobs` and `builders` (and NIX_SSHOPTS
    giving sshd's port only, so the machines file's key and host key are what count)."""

    def __init__(self, root, env, max_jobs, builders, port, log):
        self.kind = "kiln"
        self.socket = os.path.join(root, "kiln.sock")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        conf = os.path.join(root, "conf", "kiln-remote.conf")
        os.makedirs(os.path.dirname(conf), exist_ok=True)
        with open(conf, "w") as f:
            f.write(f"substituters =\nsandbox = false\nbuild-users-group =\nmax-jobs = {max_jobs}\nbuilders = {builders}\n")
        self.log = log
        self.p = subprocess.Popen([kiln_bin(), *kiln_store_args(root), "--nix-conf", conf,
                                   "--option", "gc-runtime-roots", "false", "daemon", "--socket", self.socket],
                                  env=dict(os.environ, NIX_SSHOPTS=f"-p {port}"),
                                  stdout=subprocess.DEVNULL, stderr=open(log, "ab"), preexec_fn=_CG["local"].join)
        t = time.time()
        while not os.path.exists(self.socket):
            if self.p.poll() is not None:
                raise SystemExit(f"kiln daemon exited ({self.p.returncode}) before making its socket: see {log}")
            if time.time() - t > 30:
                self.stop()
                raise SystemExit("kiln daemon did not start")
            time.sleep(0.01)
        self.env = dict(env, NIX_REMOTE=f"unix://{self.socket}")


class Nix234Daemon:
    """nix-daemon 2.34 of the sid root, in a chroot into it (its build hook is Nix itself,
    started again through /proc/self/exe, which must be the real binary), serving the store
    at `root` (a directory bind-mounted into the root at the same path) with `max-jobs` and
    `builders`; its ssh is the root's."""

    def __init__(self, root, max_jobs, builders, port, log):
        self.socket = os.path.join(root, "nix234.sock")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        conf = os.path.join(root, "conf234")
        os.makedirs(conf, exist_ok=True)
        with open(os.path.join(conf, "nix.conf"), "w") as f:
            f.write(f"substituters =\nsandbox = false\nbuild-users-group =\nmax-jobs = {max_jobs}\nbuilders = {builders}\n")
        e = [f"NIX_STORE_DIR={root}/store", f"NIX_STATE_DIR={root}/var", f"NIX_LOG_DIR={root}/log",
             f"NIX_CONF_DIR={conf}", "NIX_REMOTE=local", f"NIX_DAEMON_SOCKET_PATH={self.socket}",
             f"HOME={root}/home", f"NIX_SSHOPTS=-p {port}", "PATH=/usr/bin:/bin"]
        self.p = subprocess.Popen(["chroot", SID_ROOT, "env", "-i", *e, "nix-daemon"],
                                  stdout=subprocess.DEVNULL, stderr=open(log, "ab"), preexec_fn=_CG["local"].join)
        t = time.time()
        while not os.path.exists(self.socket):
            if self.p.poll() is not None:
                raise SystemExit(f"nix-daemon 2.34 exited ({self.p.returncode}) before making its socket: see {log}")
            if time.time() - t > 30:
                self.stop()
                raise SystemExit("nix-daemon 2.34 did not start")
            time.sleep(0.01)

    def stop(self):
        self.p.terminate()
        self.p.wait()
        if os.path.exists(self.socket):
            os.unlink(self.socket)


def bench_remote(args):
    """Remote builds: a kiln daemon offloading through sshd on loopback to kiln machines
    (separate stores on this machine: they share its CPUs, so only the overhead shows)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"):
        print("## remote: skipped (needs root and /usr/sbin/sshd)\n", flush=True)
        return
    parts = set(args.remote_parts.split(","))
    runs = args.runs
    work = os.path.join(args.dir, "remote-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    print("## remote builds: kiln daemon with `builders`, kiln machines through sshd on 127.0.0.1\n", flush=True)
    print(f"kiln: {kiln_bin()}; {subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}; "
          f"{os.cpu_count()} cores shared by the client, the daemon, ssh, sshd and the \"machines\" (so offloading "
          f"cannot be faster here: these figures are its overhead); sandbox off everywhere, no substituters, "
          f"fresh stores (local and machines) for every run, best of {runs} (by wall), scenarios interleaved.\n", flush=True)
    for k in ["local", "remote", "client"]:
        _CG[k] = CpuGroup(f"kiln-bench-{k}-{os.getpid()}")
    if not _CG["local"].path:
        raise SystemExit("the remote section needs a cpuacct cgroup (v1 /sys/fs/cgroup/cpuacct or v2) to count "
                         "the CPU of processes that outlive their parents (ssh sessions)")
    print(f"CPU is counted per cgroup ({_CG['local'].path} and siblings): the local daemon with everything it starts "
          f"(builders, ssh), sshd with everything it starts (sessions, the machines' kiln, their builders), the client; "
          f"the daemon's own CPU and its ssh clients' from /proc.\n", flush=True)
    sshd = Sshd(os.path.join(work, "sshd"))
    b = DrvBench(args, "remote-bench/drv", sandbox=False)
    logical = os.path.join(b.root, "store")
    machines = [KilnMachine(work, f"m{i}", logical, args.remote_machine_mode) for i in (1, 2)]
    mount234 = None
    try:
        if "dag" in parts:
            remote_dag(args, b, sshd, machines, work, logs, runs, nix234=False)
        if "big" in parts:
            remote_big(args, b, sshd, machines, work, logs, runs)
        if "copy" in parts:
            remote_copy(args, b, sshd, machines, work, logs, runs)
        if "nix234" in parts:
            if not (sid_nix_version() and os.path.exists(os.path.join(SID_ROOT, "usr/bin/ssh"))):
                print(f"\n**Nix 2.34 offloading skipped**: no sid root with Nix and ssh at {SID_ROOT}\n", flush=True)
            else:
                # The work directory at the same path inside the root.
                mount234 = os.path.join(SID_ROOT, work.lstrip("/"))
                os.makedirs(mount234, exist_ok=True)
                subprocess.run(["mount", "--bind", work, mount234], check=True)
                remote_dag(args, b, sshd, machines, work, logs, runs, nix234=True)
    finally:
        if mount234:
            subprocess.run(["umount", mount234])
            try:
                os.removedirs(mount234)
            except OSError:
                pass
        sshd.stop()
        for g in _CG.values():
            g.wait_empty(timeout=30)
            g.remove()
        _CG.clear()
    if not args.remote_keep:
        subprocess.run(["chmod", "-R", "u+w", work], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


def remote_run(b, drvs, outputs, daemon, sshd, machines, client_jobs, check_remote=None):
    """One realisation through `daemon` (just started, on a fresh store) with Nix 2.8's
    nix-store: a dict of wall and CPU seconds: client; local (the daemon and all it
    started); the daemon's own and reaped children's (/proc, as bench_daemon); its ssh
    processes (/proc, alive at the end); remote (sshd and all it started); the rest of the
    machine meanwhile."""
    p = daemon.p.pid
    r0, l0, c0 = _CG["remote"].cpu(), _CG["local"].cpu(), _CG["client"].cpu()
    own0, ch0 = proc_cpu_split(p)
    m0 = machine_busy()
    t = time.perf_counter()
    r = subprocess.run(["nix-store", "--realise", "--max-jobs", str(client_jobs), *drvs],
                       env=private_home(daemon.env, b.root), capture_output=True, preexec_fn=_CG["client"].join)
    wall = time.perf_counter() - t
    err = None
    if r.returncode != 0:
        err = f"exit {r.returncode}: {r.stderr.decode()[-3000:]}"
    elif len(r.stdout.split()) != outputs:
        err = f"{len(r.stdout.split())} output paths, expected {outputs}"
    # The daemon settles (builders reaped; Nix's per-client workers and their build hooks
    # exited).
    t0 = time.time()
    while time.time() - t0 < 120:
        if not [c for c in proc_children(p) if proc_comm(c) != "ssh"]:
            break
        time.sleep(0.02)
    last = proc_cpu_split(p)
    for _ in range(20):
        time.sleep(0.05)
        now = proc_cpu_split(p)
        if now == last:
            break
        last = now
    own1, ch1 = last
    ssh_pids = [c for c in proc_children(p) if proc_comm(c) == "ssh"]
    ssh_cpu = 0.0
    for c in ssh_pids:
        try:
            ssh_cpu += proc_cpu(c)
        except OSError:
            pass
    daemon.stop()
    # Sessions end once the daemon's ssh processes see their pipes close.
    lingering = []
    if not _CG["local"].wait_empty(timeout=60):
        lingering = _CG["local"].pids()
        for c in lingering:
            try:
                os.kill(int(c), 15)
            except OSError:
                pass
        _CG["local"].wait_empty(timeout=30)
    if not sshd.wait_idle(60):
        lingering += [x for x in _CG["remote"].pids() if x != str(sshd.p.pid)]
    busy = machine_busy() - m0
    where = None
    if check_remote and not err:
        where = check_remote(r.stdout.decode().split())
    res = dict(wall=wall, client=_CG["client"].cpu() - c0, local=_CG["local"].cpu() - l0, own=own1 - own0,
               reaped=ch1 - ch0, ssh=ssh_cpu, remote=_CG["remote"].cpu() - r0, err=err, where=where,
               nssh=len(ssh_pids), lingering=[f"{x} {proc_comm(x)}" for x in lingering])
    res["daemon"] = res["own"] + res["reaped"]
    res["total"] = res["client"] + res["local"] + res["remote"]
    res["other"] = max(0.0, busy - res["total"])
    return res


def remote_where(machines, paths):
    """How many of `paths` each machine holds (so, for outputs, built or received there)."""
    return [sum(1 for x in paths if m.holds(os.path.basename(x))) for m in machines]


def remote_dag(args, b, sshd, machines, work, logs, runs, nix234):
    expr, names = dag_nix(args.remote_dag_layers, 100, 2)
    n = len(names)
    drvs = b.prepare(expr, names)
    if not nix234:
        scen = [
            ("a", "local only (max-jobs 2, no builders)", "kiln", 2, 2, []),
            ("b", "max-jobs 0 + 2 kiln machines, ssh-ng:// (1 job each)", "kiln", 0, 0, [("ssh-ng", machines)]),
            ("c", "max-jobs 1 + 2 kiln machines, ssh-ng://", "kiln", 1, 1, [("ssh-ng", machines)]),
            ("d", "max-jobs 0 + 2 kiln machines, ssh:// (1 job each)", "kiln", 0, 0, [("ssh", machines)]),
        ]
        title = f"### {n:,}-derivation DAG ({args.remote_dag_layers} layers × 100, 2 inputs each) through a kiln daemon, Nix 2.8 `nix-store --realise` client"
    else:
        scen = [
            ("a234", "nix-daemon 2.34 local only (max-jobs 2, no builders)", "nix234", 2, 2, []),
            ("b234", "nix-daemon 2.34, max-jobs 0 + the 2 kiln machines, ssh-ng://", "nix234", 0, 0, [("ssh-ng", machines)]),
            ("d234", "nix-daemon 2.34, max-jobs 0 + the 2 kiln machines, ssh://", "nix234", 0, 0, [("ssh", machines)]),
        ]
        title = (f"### The same DAG through nix-daemon {sid_nix_version()} (in a chroot into {SID_ROOT}, its own ssh) "
                 f"offloading to the same 2 kiln machines, Nix 2.8 `nix-store --realise` client")
    only = set(args.remote_scenarios.split(",")) if args.remote_scenarios else None
    scen = [s for s in scen if not only or s[0] in only]
    print(f"\n{title}\n", flush=True)
    res = {s[0]: [] for s in scen}
    for run in range(runs):
        order = scen[run % len(scen):] + scen[:run % len(scen)]
        for key, label, kind, jobs, client_jobs, mach in order:
            b.restore()
            builders = " ; ".join(m.entry(sshd, t) for t, ms in mach for m in ms)
            for t, ms in mach:
                for m in ms:
                    m.fresh()
            log = os.path.join(logs, f"dag-{key}.log")
            if kind == "kiln":
                d = KilnRemoteDaemon(b.root, b.env, jobs, builders, sshd.port, log)
            else:
                d = Nix234Daemon(b.root, jobs, builders, sshd.port, log)
                d.env = dict(b.env, NIX_REMOTE=f"unix://{d.socket}")
            check = (lambda outs, ms=[m for _, ms in mach for m in ms]: remote_where(ms, outs)) if mach else None
            try:
                r = remote_run(b, drvs, n, d, sshd, machines, client_jobs, check)
            except BaseException:
                d.stop()
                raise
            r["run"] = run
            res[key].append(r)
            status = f"FAILED ({r['err'][:300]})" if r["err"] else "ok"
            print(f"<!-- run {run + 1} {key}: {status}; wall {r['wall']:.3f} s, total CPU {r['total']:.3f} s, local {r['local']:.3f} s "
                  f"(daemon own {r['own']:.3f} s, reaped {r['reaped']:.3f} s, ssh {r['ssh']:.3f} s in {r['nssh']} sessions), "
                  f"sshd+machines {r['remote']:.3f} s, client {r['client']:.3f} s, other processes {r['other']:.3f} s; "
                  f"outputs on machines {r['where']}{'; LINGERING ' + str(r['lingering']) if r['lingering'] else ''} -->", flush=True)
            if r["err"]:
                with open(os.path.join(logs, f"dag-{key}-run{run}.err"), "w") as f:
                    f.write(r["err"])
    print("\n| scenario | wall (per build) | total CPU | local: daemon + all it started | daemon CPU (/proc: own + reaped children) | daemon own | daemon's ssh clients | sshd + machines | client | vs (a) wall / total CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    best = {}
    for key, label, kind, jobs, client_jobs, mach in scen:
        ok = [r for r in res[key] if not r["err"]]
        if not ok:
            print(f"| ({key}) {label} | failed in all {runs} runs: {res[key][0]['err'][:200]!r} | | | | | | | | |", flush=True)
            continue
        r = min(ok, key=lambda x: x["wall"])
        best[key] = dict(r, min_daemon=min(x["daemon"] for x in ok), min_own=min(x["own"] for x in ok),
                         min_ssh=min(x["ssh"] for x in ok), min_total=min(x["total"] for x in ok),
                         min_local=min(x["local"] for x in ok), ok=len(ok))
        ref = best.get("a") or best.get("a234")
        vs = f"{r['wall'] / ref['wall']:.2f}x / {r['total'] / ref['total']:.2f}x" if ref and ref is not best[key] else ""
        print(f"| ({key}) {label} | {r['wall']:.3f} s ({fmt_ms(r['wall'], n)}) | {r['total']:.3f} s | {r['local']:.3f} s | {r['daemon']:.3f} s | "
              f"{r['own']:.3f} s | {r['ssh']:.3f} s | {r['remote']:.3f} s | {r['client']:.3f} s | {vs} |", flush=True)
    print(f"\nRanges over the {runs} runs: " + "; ".join(
        f"({k}) wall {min(x['wall'] for x in res[k]):.3f}–{max(x['wall'] for x in res[k]):.3f} s, "
        f"total CPU {min(x['total'] for x in res[k]):.3f}–{max(x['total'] for x in res[k]):.3f} s, "
        f"daemon {min(x['daemon'] for x in res[k]):.3f}–{max(x['daemon'] for x in res[k]):.3f} s, "
        f"daemon own {min(x['own'] for x in res[k]):.3f}–{max(x['own'] for x in res[k]):.3f} s, "
        f"other processes {min(x['other'] for x in res[k]):.1f}–{max(x['other'] for x in res[k]):.1f} s"
        + (f", outputs held by the machines {[x['where'] for x in res[k]]}" if res[k][0]['where'] else "")
        + (f", {runs - best[k]['ok']} failed" if k in best and best[k]['ok'] < runs else "")
        for k in res), flush=True)
    a = best.get("a") or best.get("a234")
    for k in ["b", "d", "b234", "d234"]:
        if a and k in best:
            x = best[k]
            ak = 'a' if 'a' in best else 'a234'
            print(f"\nPer-build offload overhead ({k} vs {ak}, least CPU of the runs, per derivation): "
                  f"daemon CPU from /proc (own + reaped children, as bench_daemon; in ({ak}) that includes the local builders) "
                  f"{(x['min_daemon'] - a['min_daemon']) / n * 1000:+.2f} ms; daemon's own CPU only "
                  f"{(x['min_own'] - a['min_own']) / n * 1000:+.2f} ms; own + its ssh clients "
                  f"{(x['min_own'] + x['min_ssh'] - a['min_own']) / n * 1000:+.2f} ms; everything local (cgroup: daemon, "
                  f"builders, ssh) {(x['min_local'] - a['min_local']) / n * 1000:+.2f} ms; whole machine (total CPU) "
                  f"{(x['min_total'] - a['min_total']) / n * 1000:+.2f} ms", flush=True)


def remote_single(b, sshd, machine, drvs, logs, runs, name, transports, size_mib, local=True, pre=None):
    """One derivation (`drvs`) realised locally and on `machine` over each transport:
    rows of wall, CPU and MiB/s of `size_mib`."""
    scen = ([("local", "built here (max-jobs 1, no builders)", 1, None)] if local else []) + \
           [(t, f"built on 1 kiln machine over {t}:// (max-jobs 0)", 0, t) for t in transports]
    res = {s[0]: [] for s in scen}
    for run in range(runs):
        for key, label, jobs, t in scen[run % len(scen):] + scen[:run % len(scen)]:
            b.restore()
            machine.fresh()
            if pre:
                pre()
            builders = machine.entry(sshd, t) if t else ""
            d = KilnRemoteDaemon(b.root, b.env, jobs, builders, sshd.port, os.path.join(logs, f"{name}-{key}.log"))
            try:
                r = remote_run(b, drvs, 1, d, sshd, [machine], jobs,
                               (lambda outs: remote_where([machine], outs)) if t else None)
            except BaseException:
                d.stop()
                raise
            res[key].append(r)
            print(f"<!-- run {run + 1} {name} {key}: {'FAILED ' + r['err'][:300] if r['err'] else 'ok'}; wall {r['wall']:.3f} s, "
                  f"total CPU {r['total']:.3f} s, local {r['local']:.3f} s (daemon own {r['own']:.3f} s, ssh {r['ssh']:.3f} s), "
                  f"sshd+machine {r['remote']:.3f} s, client {r['client']:.3f} s, other processes {r['other']:.1f} s, on machine {r['where']}"
                  f"{'; LINGERING ' + str(r['lingering']) if r['lingering'] else ''} -->", flush=True)
    out = {}
    for key, label, jobs, t in scen:
        ok = [r for r in res[key] if not r["err"]]
        if not ok:
            out[key] = (label, None, res[key][0]["err"])
        else:
            out[key] = (label, min(ok, key=lambda x: x["wall"]), None)
    return out, res


def remote_big(args, b, sshd, machines, work, logs, runs):
    size = args.remote_big_mib
    expr = ("{ big = derivation { name = \"big-out\"; system = builtins.currentSystem; builder = \"/bin/sh\"; "
            f"args = [ \"-c\" \"/usr/bin/head -c {size * (1 << 20)} /dev/zero > $out\" ]; }}; }}\n")
    drvs = b.prepare(expr, ["big"])
    print(f"\n### One derivation with a {size} MiB output (`head -c {size * (1 << 20)} /dev/zero > $out`): built here vs on one kiln machine\n", flush=True)
    # The wire's own rate: the same bytes through ssh alone (same cipher, same sshd).
    wire = None
    for _ in range(runs):
        r0 = sshd.cpu()
        w, c = measure(f"ssh {sshd.opts} root@127.0.0.1 '/usr/bin/head -c {size * (1 << 20)} /dev/zero' > /dev/null", runs=1, shell=True)
        sshd.wait_idle(30)
        if wire is None or w < wire[0]:
            wire = (w, c, sshd.cpu() - r0)
    w, c, wr = wire
    out, _ = remote_single(b, sshd, machines[0], drvs, logs, runs, "big", ["ssh-ng", "ssh"], size)
    print("| what | wall | total CPU | local: daemon + all it started | daemon own | daemon's ssh | sshd + machine | MiB/s (size / wall) | MiB/s back (size / (wall − local wall)) | vs local wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| `ssh … head -c {size}M /dev/zero > /dev/null` (the wire alone) | {w:.3f} s | {c + wr:.3f} s | | | {c:.3f} s | {wr:.3f} s | {size / w:,.0f} | | |")
    loc = out.get("local", (None, None, None))[1]
    for key, (label, r, err) in out.items():
        if r is None:
            print(f"| {label} | FAILED: {err[:300]!r} | | | | | | | | |")
            continue
        back = f"{size / (r['wall'] - loc['wall']):,.0f}" if loc and key != "local" and r["wall"] > loc["wall"] else ""
        vs = f"{r['wall'] / loc['wall']:.2f}x" if loc and key != "local" else ""
        print(f"| {label} | {r['wall']:.3f} s | {r['total']:.3f} s | {r['local']:.3f} s | {r['own']:.3f} s | {r['ssh']:.3f} s | {r['remote']:.3f} s | "
              f"{size / r['wall']:,.0f} | {back} | {vs} |", flush=True)


def remote_copy(args, b, sshd, machines, work, logs, runs):
    size = args.remote_big_mib
    m = machines[0]
    # The input: random bytes, added to the local store through the kiln daemon.
    src = os.path.join(work, "random.bin")
    with open(src, "wb") as f:
        for _ in range(size):
            f.write(os.urandom(1 << 20))
    shutil.rmtree(b.root, ignore_errors=True)
    b.env = nix_env(b.root, False, b.features)
    subprocess.run(["nix-store", "--init"], env=b.env, check=True)
    d = KilnRemoteDaemon(b.root, b.env, 1, "", sshd.port, os.path.join(logs, "copy-add.log"))
    try:
        r = subprocess.run(["nix-store", "--add", src], env=private_home(d.env, b.root), capture_output=True, text=True)
    finally:
        d.stop()
    if r.returncode != 0:
        raise SystemExit(f"nix-store --add through the kiln daemon: {r.stderr[-1500:]}")
    path = r.stdout.strip()
    os.unlink(src)
    expr = ("{ use = derivation { name = \"uses-big-input\"; system = builtins.currentSystem; builder = \"/bin/sh\"; "
            f"src = builtins.storePath \"{path}\"; args = [ \"-c\" \"echo > $out\" ]; }}; }}\n")
    f = os.path.join(b.work, "copy.nix")
    open(f, "w").write(expr)
    r = subprocess.run(["nix-instantiate", f, "-A", "use"], env=b.env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nix-instantiate: {r.stderr[-1500:]}")
    drvs = r.stdout.split()
    shutil.rmtree(b.saved, ignore_errors=True)
    shutil.copytree(b.root, b.saved, symlinks=True)
    print(f"\n### Closure copy: a {size} MiB input (one file of random bytes, `nix-store --add` through the kiln daemon) "
          f"that a derivation built on one kiln machine needs (builder `echo > $out`), vs Nix 2.8 copying the same path "
          f"to a fresh kiln machine store over the same transport\n", flush=True)
    out, _ = remote_single(b, sshd, m, drvs, logs, runs, "copy", ["ssh-ng", "ssh"], size, local=False)
    def holds_input(where):
        return m.holds(os.path.basename(path))
    print("| what | wall | total CPU | local side CPU (kiln: daemon + all it started; Nix: nix and its ssh) | sshd + machine | MiB/s (size / wall) |")
    print("|---|---|---|---|---|---|")
    for key, (label, r, err) in out.items():
        if r is None:
            print(f"| remote build {label} | FAILED: {err[:300]!r} | | | | |")
            continue
        print(f"| remote build of a derivation needing it, {label} | {r['wall']:.3f} s | {r['total']:.3f} s | "
              f"{r['local']:.3f} s | {r['remote']:.3f} s | {size / r['wall']:,.0f} |", flush=True)
    # Nix 2.8 copying the path from the same (local, no daemon) store to a fresh kiln machine.
    nenv = dict(private_home(b.env, b.root), NIX_SSHOPTS=sshd.opts)
    copies = [
        ("`nix copy --to ssh-ng://…` (Nix 2.8)",
         ["nix", "--experimental-features", "nix-command", "copy", "--no-check-sigs", "--to",
          f"ssh-ng://root@127.0.0.1?remote-program={m.stdio}", path]),
        ("`nix copy --to ssh://…` (Nix 2.8, the serve protocol)",
         ["nix", "--experimental-features", "nix-command", "copy", "--no-check-sigs", "--to",
          f"ssh://root@127.0.0.1?remote-program={m.serve}", path]),
        ("`nix-copy-closure --to 'root@127.0.0.1?remote-program=…'` (Nix 2.8)",
         ["nix-copy-closure", "--to", f"root@127.0.0.1?remote-program={m.serve}", path]),
    ]
    for label, cmd in copies:
        best = None
        err = None
        for run in range(runs):
            b.restore()
            m.fresh()
            s0, c0 = sshd.cpu(), _CG["client"].cpu()
            t = time.perf_counter()
            r = subprocess.run(cmd, env=nenv, capture_output=True, text=True, preexec_fn=_CG["client"].join)
            wall = time.perf_counter() - t
            _CG["client"].wait_empty(timeout=30)
            sshd.wait_idle(60)
            remote = sshd.cpu() - s0
            client = _CG["client"].cpu() - c0
            if r.returncode != 0:
                err = r.stderr[-600:]
                break
            if not m.holds(os.path.basename(path)):
                err = "exited 0 but the path is not in the machine's store"
                break
            if best is None or wall < best[0]:
                best = (wall, client, remote)
        if best is None:
            print(f"| {label} | FAILED: {err!r} | | | | |", flush=True)
            continue
        w, c, rem = best
        print(f"| {label} | {w:.3f} s | {c + rem:.3f} s | {c:.3f} s | {rem:.3f} s | {size / w:,.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=["formats", "store", "build", "ca", "sandbox", "daemon", "queries", "guix", "subst", "remote", "all"])
    p.add_argument("--jobs", type=int, default=2, help="max-jobs for the build benchmarks")
    p.add_argument("--dir", default="/tmp/kiln-bench", help="work directory (a tmpfs is mounted there if possible)")
    p.add_argument("--fs", choices=["tmpfs", "ext4"], default="tmpfs",
                   help="file system mounted on --dir: tmpfs, or a fresh journalled ext4 on a loop device "
                        "(sparse image under /var/tmp), to include real file-system costs such as fsync")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--runs", type=int, default=3, help="runs per figure in the daemon section (best of them, ranges given)")
    p.add_argument("--daemon-sandbox", action="store_true",
                   help="daemon section: every daemon builds sandboxed, as the build users of group nixbld")
    p.add_argument("--daemon-builds-only", action="store_true",
                   help="daemon section: only the builds through the socket (no QueryPathInfo or connections)")
    p.add_argument("--daemon-kinds", default="",
                   help="daemon section: only these daemons, comma-separated (kiln,nix,nix234)")
    p.add_argument("--daemon-clients", default="2.34,2.8",
                   help="clients for the daemon section's builds through the socket, comma-separated: "
                        "2.34 (nix-store from the Debian sid root), 2.8 (Debian's nix-bin)")
    p.add_argument("--remote-parts", default="dag,big,copy,nix234",
                   help="parts of the remote section, comma-separated: dag (the 1,000-derivation DAG offloaded), "
                        "big (a 1 GiB output brought back), copy (a 1 GiB input sent), nix234 (nix-daemon 2.34 offloading "
                        "the DAG to the same machines)")
    p.add_argument("--remote-scenarios", default="", help="only these DAG scenarios (a,b,c,d,a234,b234,d234)")
    p.add_argument("--remote-dag-layers", type=int, default=10, help="layers of 100 derivations in the remote DAG")
    p.add_argument("--remote-big-mib", type=int, default=1024, help="MiB of the remote section's big output and input")
    p.add_argument("--remote-machine-mode", choices=["ns", "root"], default="ns",
                   help="kiln machines: ns (own mount namespace with its store bind-mounted at the logical path, "
                        "sandbox off) or root (`kiln --root`, sandbox on, as the remote-builder test)")
    p.add_argument("--remote-keep", action="store_true", help="keep the remote section's work directory (logs, stores)")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if os.geteuid() == 0 and subprocess.run(["mountpoint", "-q", args.dir]).returncode != 0:
        if os.listdir(args.dir):
            # A file system mounted over it would hide what is there (binaries named in
            # KILN_BIN, an output file) for the whole run.
            raise SystemExit(f"{args.dir} is not empty and not a mount point: empty it, or pass another --dir")
        if args.fs == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12g", "tmpfs", args.dir], check=True)
        else:
            img = "/var/tmp/kiln-bench-ext4.img"
            if os.path.exists(img):
                os.unlink(img)
            subprocess.run(["truncate", "-s", "16G", img], check=True)
            subprocess.run(["mkfs.ext4", "-q", img], check=True)
            subprocess.run(["mount", "-o", "loop", img, args.dir], check=True)
    print(f"work directory: {args.dir} ({args.fs})")
    if not args.no_build:
        build_kiln()
    print(f"machine: {os.cpu_count()} cores, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
          f"{time.strftime('%Y-%m-%d')}, nix {subprocess.run(['nix-store', '--version'], capture_output=True, text=True).stdout.strip()}\n")
    whats = set(args.what)
    if "all" in whats or "formats" in whats:
        bench_formats(args)
    if "all" in whats or "store" in whats:
        bench_store(args)
    if "all" in whats or "build" in whats:
        bench_build(args)
    if "all" in whats or "ca" in whats:
        bench_ca(args)
    if "all" in whats or "sandbox" in whats:
        bench_sandbox(args)
    if "all" in whats or "daemon" in whats:
        bench_daemon(args)
    if "all" in whats or "queries" in whats:
        bench_queries(args)
    if "all" in whats or "guix" in whats:
        bench_guix(args)
    if "all" in whats or "subst" in whats:
        bench_subst(args)
    if "all" in whats or "remote" in whats:
        bench_remote(args)


if __name__ == "__main__":
    sys.exit(main())
