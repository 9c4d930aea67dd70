"""Upload a dataset-like directory over an emulated WAN link: our tar stream vs the usual tools.

    sudo python bench/bench_transfer.py --wanem PATH/wanem.py [--files 200] [--file-mb 1.0] [--delay-ms 25] [--rate-mbit 200]

Builds three network namespaces of its own (controller | link | host) joined by veth pairs,
with a userspace WAN emulator (a layer-2 bridge with one-way delay, rate limit and drop-tail
queue, for kernels without tc netem; named by `--wanem PATH` or $ORCHESTRATE_WANEM) in the middle,
and a real sshd in the host namespace. In the controller namespace it then uploads the same directory (hundreds of ~1 MB
incompressible PNG-like files) with: raw TCP (the link's real goodput), our tar stream
(SSHTransport.put), paramiko SFTP put per file, OpenSSH `scp -r` and rsync over ssh; every
upload lands in an empty directory and is checked by size. Prints a table: MB/s, % of the
nominal link rate, % of the most TCP payload the link can carry, % of raw TCP, ratio to scp.
Namespaces, sshd and the emulator are removed in `finally` (and on SIGTERM/SIGINT). Traffic stays inside these namespaces.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS_CTL, NS_LINK, NS_HOST = "orchtx_ctl", "orchtx_link", "orchtx_host"
CTL_IP, HOST_IP = "10.203.0.1", "10.203.0.2"
SSH_PORT, TCP_PORT = 2222, 5201


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


# -- the link -------------------------------------------------------------------------------------
def link_up(wanem: Path, delay_ms: float, rate_mbit: float, state: Path) -> subprocess.Popen:
    for ns in (NS_CTL, NS_LINK, NS_HOST):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "otc0", "netns", NS_CTL, "type", "veth", "peer", "name", "otw0", "netns", NS_LINK)
    sh("ip", "link", "add", "oth0", "netns", NS_HOST, "type", "veth", "peer", "name", "otw1", "netns", NS_LINK)
    sh("ip", "-n", NS_CTL, "addr", "add", f"{CTL_IP}/24", "dev", "otc0")
    sh("ip", "-n", NS_HOST, "addr", "add", f"{HOST_IP}/24", "dev", "oth0")
    if shutil.which("ethtool") is None:      # as the shared up.sh does: offloads must go off
        sh("apt-get", "install", "-y", "-qq", "ethtool")
    for ns, dev in ((NS_CTL, "otc0"), (NS_LINK, "otw0"), (NS_LINK, "otw1"), (NS_HOST, "oth0")):
        sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off",
           "gso", "off", "gro", "off", check=False)
    for dev in ("otw0", "otw1"):
        sh("ip", "-n", NS_LINK, "link", "set", dev, "addrgenmode", "none")
        sh("ip", "-n", NS_LINK, "link", "set", dev, "promisc", "on")
        sh("ip", "-n", NS_LINK, "link", "set", dev, "up")
    sh("ip", "-n", NS_CTL, "link", "set", "otc0", "up")
    sh("ip", "-n", NS_HOST, "link", "set", "oth0", "up")
    log = open(state / "wanem.log", "w")
    emu = subprocess.Popen(["ip", "netns", "exec", NS_LINK, sys.executable, str(wanem), "otw0", "otw1",
                            str(delay_ms), str(rate_mbit)], stdout=log, stderr=subprocess.STDOUT)
    return emu


def wait_reachable(port: int, timeout_s: float = 15.0) -> None:
    """Until a TCP connect from the controller namespace crosses the emulator."""
    probe = (f"import socket,time,sys\nend=time.monotonic()+{timeout_s}\n"
             f"while time.monotonic()<end:\n"
             f"    try: socket.create_connection(('{HOST_IP}',{port}),timeout=2).close(); sys.exit(0)\n"
             f"    except OSError: time.sleep(0.2)\nsys.exit(1)")
    if subprocess.run(["ip", "netns", "exec", NS_CTL, sys.executable, "-c", probe],
                      timeout=timeout_s + 10).returncode != 0:
        raise RuntimeError(f"{HOST_IP}:{port} is not reachable through the emulated link")


def link_down(emu: subprocess.Popen | None) -> None:
    if emu is not None and emu.poll() is None:
        emu.terminate()
        try:
            emu.wait(timeout=5)
        except subprocess.TimeoutExpired:
            emu.kill()
    for ns in (NS_CTL, NS_LINK, NS_HOST):
        sh("ip", "netns", "del", ns, check=False)


# -- data -----------------------------------------------------------------------------------------
def make_dataset(root: Path, n_files: int, file_mb: float) -> int:
    rnd = random.Random(0)
    total = 0
    for i in range(n_files):
        split = "train" if i % 10 < 7 else "test"
        d = root / split
        d.mkdir(parents=True, exist_ok=True)
        size = int(file_mb * 1e6 * rnd.uniform(0.8, 1.2))
        body = b"\x89PNG\r\n\x1a\n" + os.urandom(size - 8)          # incompressible like PNG data
        (d / f"r_{i}.png").write_bytes(body)
        total += size
    for split in ("train", "test"):
        frames = [{"file_path": f"./{split}/{p.stem}"} for p in sorted((root / split).glob("*.png"))]
        text = json.dumps({"camera_angle_x": 0.69, "frames": frames})
        (root / f"transforms_{split}.json").write_text(text)
        total += len(text)
    return total


# -- the client side (runs inside the controller namespace) ---------------------------------------
def client(args: argparse.Namespace) -> None:
    import paramiko

    from orchestrator.providers.base import Endpoint
    from orchestrator.transport.ssh import SSHAuth, SSHTransport

    src, key, remote_base = Path(args.src), args.key, args.remote
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    results: dict[str, float] = {}
    tr = SSHTransport(lambda: Endpoint(HOST_IP, SSH_PORT, "root"), root=remote_base,
                      auth=SSHAuth(identity_file=key, allow_agent=False, look_for_keys=False))

    def fresh(name: str) -> str:
        dest = f"{remote_base}/{name}"
        tr.run(f"rm -rf {dest}")
        return dest

    def check(dest: str) -> None:
        got = int(tr.run(f"find {dest} -type f -printf '%s\\n' | awk '{{s+=$1}} END {{print s+0}}'")
                  .stdout.strip())
        if got != total:
            raise SystemExit(f"{dest}: {got} bytes on the host, expected {total}")

    # raw TCP goodput: the ceiling any protocol on this link can reach
    with socket.create_connection((HOST_IP, TCP_PORT), timeout=30) as s:
        n, chunk = 150_000_000, b"\0" * (1 << 20)
        t0 = time.monotonic()
        sent = 0
        while sent < n:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(16)
        results["raw TCP (150 MB)"] = sent / (time.monotonic() - t0)

    dest = fresh("ours")
    t0 = time.monotonic()
    st = tr.put(src, dest)
    results["ours: tar stream (SSHTransport.put)"] = total / (time.monotonic() - t0)
    check(dest)
    assert st.bytes == total
    t0 = time.monotonic()
    again = tr.put(src, dest)
    results["_second_put_s"] = time.monotonic() - t0
    results["_second_put_bytes"] = again.bytes

    dest = fresh("sftp")
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect(HOST_IP, SSH_PORT, "root", key_filename=key, allow_agent=False, look_for_keys=False)
    t0 = time.monotonic()
    sftp = c.open_sftp()
    made: set[str] = set()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_dir():
            continue
        parent = f"{dest}/{rel}".rsplit("/", 1)[0]
        for i in range(len(dest.split("/")), len(parent.split("/")) + 1):
            d = "/".join(parent.split("/")[:i])
            if d and d not in made:
                try:
                    sftp.mkdir(d)
                except OSError:
                    pass
                made.add(d)
        sftp.put(str(p), f"{dest}/{rel}")
    sftp.close()
    results["paramiko SFTP put per file"] = total / (time.monotonic() - t0)
    c.close()
    check(dest)

    ssh_opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-i", key]
    dest = fresh("scp")
    t0 = time.monotonic()
    subprocess.run(["scp", "-q", "-r", "-P", str(SSH_PORT), *ssh_opts, str(src), f"root@{HOST_IP}:{dest}"],
                   check=True, timeout=1800)
    results["OpenSSH scp -r"] = total / (time.monotonic() - t0)
    check(dest)

    dest = fresh("rsync")
    t0 = time.monotonic()
    subprocess.run(["rsync", "-a", "-e", " ".join(["ssh", "-p", str(SSH_PORT), *ssh_opts]),
                    f"{src}/", f"root@{HOST_IP}:{dest}/"], check=True, timeout=1800)
    results["rsync -a over ssh"] = total / (time.monotonic() - t0)
    check(dest)
    tr.run(f"rm -rf {remote_base}/ours {remote_base}/sftp {remote_base}/scp {remote_base}/rsync")
    tr.close()
    results["_total_bytes"] = total
    sys.stdout.write(json.dumps(results) + "\n")


TCP_SINK = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1); srv.settimeout(900)
conn, _ = srv.accept(); conn.settimeout(900)
while conn.recv(1 << 20):
    pass
conn.sendall(b"ok"); conn.close()
"""


def report(results: dict[str, float], rate_mbit: float, delay_ms: float, n_files: int) -> str:
    link = rate_mbit * 1e6 / 8
    tcp = results["raw TCP (150 MB)"]
    scp = results["OpenSSH scp -r"]
    total = results["_total_bytes"]
    # the emulator meters whole Ethernet frames: at MTU 1500 a 1514-byte frame carries 1448
    # bytes of TCP payload (20 IP + 32 TCP with timestamps + 14 Ethernet), the best any
    # TCP-based transfer can do on this link
    payload_max = link * 1448 / 1514
    lines = [f"upload of {n_files} files, {total / 1e6:.0f} MB, over {2 * delay_ms:.0f} ms RTT / "
             f"{rate_mbit:.0f} Mbit/s ({link / 1e6:.1f} MB/s nominal, {payload_max / 1e6:.1f} MB/s "
             f"max TCP payload)", "",
             f"{'method':<40} {'MB/s':>7} {'% link':>7} {'% max':>7} {'% TCP':>7} {'x scp':>7}"]
    for name, rate in results.items():
        if name.startswith("_"):
            continue
        lines.append(f"{name:<40} {rate / 1e6:>7.2f} {100 * rate / link:>6.1f}% "
                     f"{100 * rate / payload_max:>6.1f}% {100 * rate / tcp:>6.1f}% "
                     f"{rate / scp:>7.2f}")
    lines.append("")
    lines.append(f"second put of the same tree (manifest: nothing changed): "
                 f"{results['_second_put_bytes']:.0f} bytes sent in {results['_second_put_s']:.2f} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--file-mb", type=float, default=1.0)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one way (RTT is twice this)")
    ap.add_argument("--rate-mbit", type=float, default=200.0)
    ap.add_argument("--wanem", type=Path, default=os.environ.get("ORCHESTRATE_WANEM"),
                    help="the WAN emulator script: wanem.py IF_A IF_B --delay-ms D --rate-mbit R "
                         "(default $ORCHESTRATE_WANEM)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--remote", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client(args)
        return 0
    if os.geteuid() != 0:
        sys.stderr.write("error: this benchmark needs root (network namespaces)\n")
        return 2
    if args.wanem is None or not Path(args.wanem).is_file():
        sys.stderr.write(f"error: WAN emulator not found at {args.wanem} "
                         "(pass --wanem PATH or set ORCHESTRATE_WANEM)\n")
        return 2
    existing = sh("ip", "netns", "list").stdout
    if NS_CTL in existing:
        sys.stderr.write(f"error: namespace {NS_CTL} exists: another run is going on, or clean up "
                         f"with `ip netns del {NS_CTL} {NS_LINK} {NS_HOST}`\n")
        return 2
    from orchestrator.testing.sshd import SSHServer

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    emu = sink = None
    srv: SSHServer | None = None

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    try:
        src = work / "dataset"
        total = make_dataset(src, args.files, args.file_mb)
        print(f"dataset: {args.files} files, {total / 1e6:.0f} MB in {src}", flush=True)
        emu = link_up(Path(args.wanem), args.delay_ms, args.rate_mbit, work)
        srv = SSHServer(base_dir=work / "sshd", host=HOST_IP, netns=NS_HOST, port=SSH_PORT).start()
        wait_reachable(SSH_PORT)
        sink = subprocess.Popen(["ip", "netns", "exec", NS_HOST, sys.executable, "-c", TCP_SINK,
                                 HOST_IP, str(TCP_PORT)])
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", NS_CTL, sys.executable, __file__, "--client",
                              "--src", str(src), "--key", str(srv.client_key_path),
                              "--remote", str(work / "remote")],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-3000:])
            return 1
        results = json.loads(out.stdout.strip().splitlines()[-1])
        print(report(results, args.rate_mbit, args.delay_ms, args.files))
        return 0
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
        if srv is not None:
            srv.stop()
        link_down(emu)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
