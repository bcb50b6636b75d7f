#!/usr/bin/env python3
"""Benchmark of issue 3: the gateway polling 200 simulated DTSU666 meters.

Run from the workspace root (Python 3.9+, standard library only; needs
hyperfine, mbpoll and tcpdump for the single-poll part):

    python3 benches/gateway_poll.py

What it does, all on 127.0.0.1 with free ports, in a fresh temp dir:

1. `cargo build --release --workspace --bins` (skip with --no-build).
2. Writes a site file: 20 Modbus TCP device servers x 10 DTSU666 units =
   200 meters, 100 lines (each a stenter and its main fan), one gateway
   polling every 1 s; and a scenario at time_scale 1 starting now.
3. Load runs (--runs, default 3): starts facwatch-ingest (embedded broker),
   facwatch-sim and facwatch-gateway (real clock), waits --warmup seconds,
   then measures the gateway process for --measure seconds: CPU
   ((utime+stime) delta / wall, % of one core, from /proc/PID/stat), peak
   RSS (VmHWM of /proc/PID/status at the end of the window) and the samples
   it delivered: a bare MQTT 3.1.1 subscriber (in this script) decodes every
   batch the gateway publishes and counts the samples whose acquisition
   time falls in the window. All processes are stopped after each run.
4. One poll of one meter: hyperfine runs `facwatch-gateway probe` and
   mbpoll side by side against the simulator (no gateway running).
5. On the wire: tcpdump on lo records (a) a few seconds of the gateway
   polling all 200 meters and (b) a few probe and mbpoll invocations; the
   script reports per-request round trips and per-poll times measured
   between packets, i.e. without process start-up. This phase runs after
   the load runs so tcpdump never shares the CPU with a measured window.

Before each measured phase the script waits while a cargo/rustc process is
running (the machine is shared), and it records the load of the rest of the
machine during each window. It prints a Markdown report at the end and
writes the raw figures to results.json in the temp dir (kept with --keep).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from zoneinfo import ZoneInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
GATEWAY_BIN = os.path.join(RELEASE, "facwatch-gateway")
INGEST_BIN = os.path.join(RELEASE, "facwatch-ingest")
SIM_BIN = os.path.join(RELEASE, "facwatch-sim")

SITE_ID = "bench-plant"
GATEWAY_ID = "gw-bench"
TIME_ZONE = "Asia/Shanghai"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The probe's reads: Profile::builtin(Dtsu666).reads(ReadLimits::default()),
# function 03, (address, registers).
DTSU666_READS = [(0x2006, 14), (0x202A, 2), (0x401E, 2)]


# ---------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_ports(count: int) -> list[int]:
    """Binds 127.0.0.1:0 `count` times at once, then releases the ports."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_quiet_machine(max_wait_s: float) -> None:
    """Waits while cargo or rustc runs (another process may be building)."""
    pattern = r"cargo (test|build|clippy|run|check)|/rustc |^rustc "
    started = time.monotonic()
    announced = False
    while True:
        busy = subprocess.run(
            ["pgrep", "-f", pattern], capture_output=True, text=True
        ).stdout.split()
        busy = [p for p in busy if int(p) != os.getpid()]
        if not busy:
            return
        if not announced:
            log(f"waiting for cargo/rustc to finish (pids {' '.join(busy)})")
            announced = True
        if time.monotonic() - started > max_wait_s:
            log("cargo/rustc still running; measuring anyway (figures may be skewed)")
            return
        time.sleep(5)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # Field 2 (comm) may contain spaces: split after its closing paren.
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest, already counted in user
    return total - idle, total


class Processes:
    """Processes this script started; stopped by pid, never by name."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], log_path: str, **kw) -> subprocess.Popen:
        stderr = open(log_path, "wb")
        proc = subprocess.Popen(args, stderr=stderr, cwd=kw.pop("cwd", None), **kw)
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout_s: float = 10) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


# ------------------------------------------------------------- the plant


def write_plant(
    directory: str, ports: list[int], units_per_server: int, interval_s: int
) -> dict:
    """Writes bench.site.toml and bench.scenario.toml; returns the layout."""
    lines_per_server = units_per_server // 2
    out = [
        "# Generated by benches/gateway_poll.py: 200 DTSU666 meters on 20",
        "# Modbus TCP device servers, 100 stenter lines (stenter + main fan).",
        "[site]",
        f'id = "{SITE_ID}"',
        'name = "Benchmark plant"',
        f'time_zone = "{TIME_ZONE}"',
        "",
        "[[gateways]]",
        f'id = "{GATEWAY_ID}"',
        f"poll_interval_secs = {interval_s}",
        "modbus_timeout_ms = 250",
        "batch_interval_secs = 60",
        "",
    ]
    line_ids = []
    meters = []
    for s, port in enumerate(ports):
        for k in range(lines_per_server):
            n = s * lines_per_server + k + 1
            line = f"line{n:03d}"
            line_ids.append(line)
            for unit, (suffix, ct) in enumerate(
                [("stenter", 40), ("main-fan", 10)], start=2 * k + 1
            ):
                meter = f"l{n:03d}-{suffix}"
                meters.append((meter, port, unit))
                out += [
                    "[[meters]]",
                    f'id = "{meter}"',
                    f'gateway = "{GATEWAY_ID}"',
                    'profile = "dtsu666"',
                    f'tcp = "127.0.0.1:{port}"',
                    f"unit = {unit}",
                    f"ct_ratio = {ct}",
                    "pt_ratio = 1",
                    "",
                ]
            out += [
                "[[lines]]",
                f'id = "{line}"',
                f'name = "Stenter line {n}"',
                "",
                "[[lines.facilities]]",
                f'id = "l{n:03d}-stenter"',
                'kind = "stenter"',
                f'meter = "l{n:03d}-stenter"',
                "rated_kw = 150",
                "start_threshold_kw = 20",
                "stop_threshold_kw = 16",
                "",
                "[[lines.facilities]]",
                f'id = "l{n:03d}-main-fan"',
                'kind = "main_fan"',
                f'meter = "l{n:03d}-main-fan"',
                "rated_kw = 22",
                "start_threshold_kw = 4",
                "stop_threshold_kw = 3",
                "",
            ]
    with open(os.path.join(directory, "bench.site.toml"), "w") as f:
        f.write("\n".join(out))

    # The plant runs now: a production shift from an hour ago to three hours
    # from now (site local time); the scenario starts at the anchor.
    zone = ZoneInfo(TIME_ZONE)
    now = dt.datetime.now(tz=zone).replace(microsecond=0)
    start = now - dt.timedelta(seconds=5)
    end = now + dt.timedelta(hours=6)
    shift_start = (now - dt.timedelta(hours=1)).strftime("%H:%M")
    shift_end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    scenario = [
        "# Generated by benches/gateway_poll.py: the plant at work, real time.",
        'site_file = "bench.site.toml"',
        "seed = 3",
        f'start = "{start.isoformat()}"',
        f'end = "{end.isoformat()}"',
        "time_scale = 1",
        "",
        "[[shifts]]",
        "lines = [" + ", ".join(f'"{l}"' for l in line_ids) + "]",
        f'production_start = "{shift_start}"',
        f'production_end = "{shift_end}"',
        "treatment_lead_mins = 10",
        "treatment_lag_mins = 20",
        "",
    ]
    with open(os.path.join(directory, "bench.scenario.toml"), "w") as f:
        f.write("\n".join(scenario))
    return {
        "meters": meters,
        "lines": len(line_ids),
        "scenario_start_ms": int(start.timestamp() * 1000),
    }


def write_ingest_config(directory: str, broker_port: int) -> str:
    path = os.path.join(directory, "ingest.toml")
    with open(path, "w") as f:
        f.write(
            f'sites_dir = "."\n'
            f'store_path = "ingest.redb"\n'
            f"[broker]\n"
            f'mode = "embedded"\n'
            f'listen = "127.0.0.1:{broker_port}"\n'
            f"[mqtt]\n"
            f'client_id = "facwatch-ingest"\n'
        )
    return path


def write_gateway_config(directory: str, broker_port: int, buffer_name: str) -> str:
    path = os.path.join(directory, "gateway.toml")
    with open(path, "w") as f:
        f.write(
            f'site_file = "bench.site.toml"\n'
            f'gateway_id = "{GATEWAY_ID}"\n'
            f"[mqtt]\n"
            f'host = "127.0.0.1"\n'
            f"port = {broker_port}\n"
            f"[buffer]\n"
            f'path = "{buffer_name}"\n'
            f"[forward]\n"
            f"window_batches = 16\n"
            f"ack_timeout_ms = 5000\n"
        )
    return path


# ------------------------------------------------- batches off the broker


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def decode_batch(payload: bytes) -> tuple[int, list[tuple[str, int, int]]]:
    """postcard Batch (proto/src/wire.rs) -> (seq, [(meter, time_ms, quality)])."""
    if payload[0] != 1:
        raise ValueError(f"wire version {payload[0]}")
    i = 1
    n, i = read_varint(payload, i)
    i += n  # gateway
    seq, i = read_varint(payload, i)
    _, i = read_varint(payload, i)  # dropped_before
    count, i = read_varint(payload, i)
    samples = []
    for _ in range(count):
        n, i = read_varint(payload, i)
        meter = payload[i : i + n].decode()
        i += n
        zigzag, i = read_varint(payload, i)
        time_ms = (zigzag >> 1) ^ -(zigzag & 1)
        quality, i = read_varint(payload, i)
        if quality == 2:  # Exception(u8)
            i += 1
        for size in (4, 8):  # power_kw: Option<f32>, energy_kwh: Option<f64>
            present = payload[i]
            i += 1 + (size if present else 0)
        for _ in range(2):  # voltage_v, current_a: Vec<f32>
            n, i = read_varint(payload, i)
            i += 4 * n
        present = payload[i]  # power_factor: Option<f32>
        i += 1 + (4 if present else 0)
        samples.append((meter, time_ms, quality))
    if i != len(payload):
        raise ValueError(f"{len(payload) - i} trailing bytes")
    return seq, samples


def check_decoder() -> None:
    """The golden bytes of proto/src/wire.rs's batch test."""
    golden = bytes(
        [0x01, 0x03, *b"gw1", 0xAC, 0x02, 0x02, 0x02, 0x02, *b"m1",
         0xC0, 0xA8, 0xA2, 0xA1, 0xA1, 0x61, 0x00, 0x01, 0x00, 0x00, 0xC0, 0x3F,
         0x01, 0, 0, 0, 0, 0, 0, 0x00, 0x40, 0x01, 0x00, 0x00, 0x5C, 0x43,
         0x00, 0x00, 0x02, *b"m2", 0x01, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00]
    )  # fmt: skip
    assert decode_batch(golden) == (300, [("m1", 1_670_911_380_000, 0), ("m2", -1, 2)])


def mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def mqtt_packet(kind: int, body: bytes) -> bytes:
    length = len(body)
    encoded = bytearray()
    while True:
        byte = length % 128
        length //= 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind]) + bytes(encoded) + body


class BatchCounter(threading.Thread):
    """A bare MQTT 3.1.1 client subscribed (QoS 0) to the gateway's batch
    topic; keeps (meter, time_ms, quality) of every batch seq once."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(1.0)
        self.buf = b""
        self.lock = threading.Lock()
        self.samples: list[tuple[str, int, int]] = []
        self.seqs: set[int] = set()
        self.batches = 0
        self.duplicates = 0
        self.max_time_ms = 0
        self.stopping = False
        self.error: str | None = None
        connect = (
            mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60)
            + mqtt_string(f"bench-counter-{os.getpid()}")
        )  # fmt: skip
        self.sock.sendall(mqtt_packet(0x10, connect))
        kind, body = self._read_packet(deadline=time.monotonic() + 5)
        if kind >> 4 != 2 or body[1] != 0:
            raise RuntimeError(f"MQTT CONNACK refused: {kind:#x} {body!r}")
        self.sock.sendall(mqtt_packet(0x82, struct.pack(">H", 1) + mqtt_string(topic) + b"\x00"))
        kind, body = self._read_packet(deadline=time.monotonic() + 5)
        if kind >> 4 != 9 or body[-1] == 0x80:
            raise RuntimeError(f"MQTT SUBACK refused: {kind:#x} {body!r}")

    def _read_exact(self, n: int, deadline: float | None) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                if self.stopping:
                    raise EOFError
                continue
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_packet(self, deadline: float | None = None) -> tuple[int, bytes]:
        kind = self._read_exact(1, deadline)[0]
        length = shift = 0
        while True:
            b = self._read_exact(1, deadline)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        return kind, self._read_exact(length, deadline)

    def run(self) -> None:
        last_ping = time.monotonic()
        try:
            while not self.stopping:
                if time.monotonic() - last_ping > 20:
                    self.sock.sendall(b"\xc0\x00")  # PINGREQ
                    last_ping = time.monotonic()
                kind, body = self._read_packet()
                if kind >> 4 != 3:
                    continue
                topic_len = struct.unpack(">H", body[:2])[0]
                start = 2 + topic_len + (2 if (kind >> 1) & 3 else 0)
                seq, samples = decode_batch(body[start:])
                with self.lock:
                    if seq in self.seqs:
                        self.duplicates += 1
                        continue
                    self.seqs.add(seq)
                    self.batches += 1
                    self.samples.extend(samples)
                    self.max_time_ms = max([self.max_time_ms] + [s[1] for s in samples])
        except EOFError:
            pass
        except Exception as e:  # reported with the run's figures
            self.error = repr(e)

    def close(self) -> None:
        self.stopping = True
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.join(5)
        self.sock.close()


# ------------------------------------------------------------ load runs


def start_ingest(procs: Processes, tmp: str, broker_port: int, tag: str) -> subprocess.Popen:
    config = write_ingest_config(tmp, broker_port)
    proc = procs.start(
        "ingest", [INGEST_BIN, "--config", config], os.path.join(tmp, f"ingest{tag}.log"),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ingest exited with {proc.returncode}; see ingest{tag}.log")
        with open(os.path.join(tmp, f"ingest{tag}.log")) as f:
            if "Ingest starting." in f.read():
                return proc
        time.sleep(0.1)
    raise RuntimeError("ingest did not start within 30 s")


def start_sim(procs: Processes, tmp: str, anchor_ms: int, servers: int, tag: str) -> subprocess.Popen:
    proc = procs.start(
        "sim",
        [SIM_BIN, "--scenario", os.path.join(tmp, "bench.scenario.toml"),
         "--clock-anchor-unix-ms", str(anchor_ms), "--print-endpoints"],
        os.path.join(tmp, f"sim{tag}.log"),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    for _ in range(servers):  # one line per bus once every bus is bound
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator exited with {proc.wait()}; see sim{tag}.log")
    return proc


def load_run(args, tmp: str, layout: dict, ports: list[int], index: int) -> dict:
    procs = Processes()
    tag = f"-run{index}"
    try:
        wait_for_quiet_machine(args.max_wait)
        broker_port = free_ports(1)[0]
        ingest = start_ingest(procs, tmp, broker_port, tag)
        counter = BatchCounter(broker_port, f"facwatch/v1/{GATEWAY_ID}/batch")
        counter.start()
        sim = start_sim(procs, tmp, layout["scenario_start_ms"], len(ports), tag)
        config = write_gateway_config(tmp, broker_port, f"gw{tag}.buffer.redb")
        gateway = procs.start(
            "gateway", [GATEWAY_BIN, "--config", config],
            os.path.join(tmp, f"gateway{tag}.log"), stdout=subprocess.DEVNULL,
        )  # fmt: skip
        started = time.monotonic()
        time.sleep(args.warmup)
        if gateway.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.returncode}; see gateway{tag}.log")

        pids = {"gateway": gateway.pid, "sim": sim.pid, "ingest": ingest.pid}
        t0_wall_ms = int(time.time() * 1000)
        t0 = time.monotonic()
        ticks0 = {k: cpu_ticks(p) for k, p in pids.items()}
        sys0 = system_ticks()
        rss_series = []  # (seconds into the window, VmRSS KB)
        while (left := t0 + args.measure - time.monotonic()) > 0:
            time.sleep(min(left, args.rss_every) if args.rss_every else left)
            if args.rss_every and time.monotonic() < t0 + args.measure - 0.5:
                rss_series.append((round(time.monotonic() - t0), status_kb(gateway.pid, "VmRSS")))
        t1 = time.monotonic()
        ticks1 = {k: cpu_ticks(p) for k, p in pids.items()}
        sys1 = system_ticks()
        t1_wall_ms = int(time.time() * 1000)
        hwm_kb = status_kb(gateway.pid, "VmHWM")
        rss_kb = status_kb(gateway.pid, "VmRSS")
        threads = status_kb(gateway.pid, "Threads")
        wall = t1 - t0

        # Wait until batches past the window have arrived (a batch closes at
        # 128 KiB, about every 8-10 s at 200 samples/s).
        deadline = time.monotonic() + 90
        while counter.max_time_ms < t1_wall_ms + 2000 and time.monotonic() < deadline:
            time.sleep(0.5)
        procs.stop(gateway)
        counter.close()
        procs.stop(sim)
        procs.stop(ingest)

        with counter.lock:
            in_window = [s for s in counter.samples if t0_wall_ms <= s[1] < t1_wall_ms]
        per_meter: dict[str, list[int]] = {}
        for meter, time_ms, _ in in_window:
            per_meter.setdefault(meter, []).append(time_ms)
        gaps = []
        for times in per_meter.values():
            times.sort()
            gaps += [b - a for a, b in zip(times, times[1:])]
        window_s = (t1_wall_ms - t0_wall_ms) / 1000
        cpu_pct = {k: 100 * (ticks1[k] - ticks0[k]) / CLK_TCK / wall for k in pids}
        sys_busy = 100 * (sys1[0] - sys0[0]) / (sys1[1] - sys0[1]) * os.cpu_count()
        result = {
            "run": index,
            "warmup_s": round(t0 - started, 1),
            "wall_s": round(wall, 2),
            "gateway_cpu_pct": round(cpu_pct["gateway"], 2),
            "gateway_cpu_s": (ticks1["gateway"] - ticks0["gateway"]) / CLK_TCK,
            "gateway_vmhwm_kb": hwm_kb,
            "gateway_vmrss_kb": rss_kb,
            "gateway_threads": threads,
            "gateway_rss_series_kb": rss_series,
            "sim_cpu_pct": round(cpu_pct["sim"], 1),
            "ingest_cpu_pct": round(cpu_pct["ingest"], 1),
            "machine_busy_pct_of_one_core": round(sys_busy, 1),
            "others_pct_of_one_core": round(sys_busy - sum(cpu_pct.values()), 1),
            "samples_in_window": len(in_window),
            "samples_ok_in_window": sum(1 for s in in_window if s[2] == 0),
            "samples_per_s": round(len(in_window) / window_s, 1),
            "gateway_cpu_us_per_sample": round(
                1e6 * (ticks1["gateway"] - ticks0["gateway"]) / CLK_TCK / max(len(in_window), 1), 1
            ),
            "meters_seen": len(per_meter),
            "samples_per_meter_min": min((len(t) for t in per_meter.values()), default=0),
            "samples_per_meter_max": max((len(t) for t in per_meter.values()), default=0),
            "interval_median_ms": statistics.median(gaps) if gaps else None,
            "interval_max_ms": max(gaps) if gaps else None,
            "batches_received": counter.batches,
            "batches_duplicate": counter.duplicates,
            "subscriber_error": counter.error,
            "warnings_in_gateway_log": count_warnings(os.path.join(tmp, f"gateway{tag}.log")),
        }
        if rss_series:
            log("VmRSS KB by second of the window: " + ", ".join(f"{t}s {kb}" for t, kb in rss_series))
        log(
            f"run {index}: gateway {result['gateway_cpu_pct']} % of a core, "
            f"VmHWM {hwm_kb} KB, {result['samples_per_s']} samples/s "
            f"({result['samples_ok_in_window']} ok of {len(in_window)})"
        )
        return result
    finally:
        procs.stop_all()


def count_warnings(path: str) -> int:
    with open(path, errors="replace") as f:
        return sum(1 for line in f if " WARN " in line or " ERROR " in line)


# ------------------------------------------------------- one poll of one meter


def mbpoll_cmd(port: int, address: int, registers: int) -> str:
    return (
        f"mbpoll -m tcp -a 1 -0 -r {address} -c {registers // 2} -t 4:float -B -1 "
        f"-p {port} 127.0.0.1"
    )


def single_poll_commands(port: int) -> dict[str, str]:
    probe = f"{GATEWAY_BIN} probe --profile dtsu666 --tcp 127.0.0.1:{port} --unit 1 --ct 1 --json"
    three = " && ".join(mbpoll_cmd(port, a, n) for a, n in DTSU666_READS)
    largest = mbpoll_cmd(port, *DTSU666_READS[0])
    return {"probe": probe, "mbpoll-3-reads": three, "mbpoll-largest": largest}


def hyperfine_phase(args, tmp: str, layout: dict, ports: list[int]) -> dict:
    procs = Processes()
    try:
        wait_for_quiet_machine(args.max_wait)
        start_sim(procs, tmp, layout["scenario_start_ms"], len(ports), "-hyperfine")
        commands = single_poll_commands(ports[0])
        for name, cmd in commands.items():  # each must succeed first
            out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{name} failed: {out.stderr.strip()}")
        export = os.path.join(tmp, "hyperfine.json")
        hf = ["hyperfine", "--warmup", str(args.hf_warmup), "--runs", str(args.hf_runs),
              "--export-json", export, "--style", "basic"]  # fmt: skip
        for name, cmd in commands.items():
            hf += ["--command-name", name, cmd]
        log("hyperfine: " + " ".join(hf[:8]) + " ...")
        subprocess.run(hf, check=True, stdout=sys.stderr)
        with open(export) as f:
            data = json.load(f)
        return {
            "commands": commands,
            "results": {
                r["command"]: {
                    "median_ms": round(1000 * r["median"], 2),
                    "mean_ms": round(1000 * r["mean"], 2),
                    "stddev_ms": round(1000 * r["stddev"], 2),
                    "min_ms": round(1000 * r["min"], 2),
                    "user_ms": round(1000 * r["user"], 2),
                    "system_ms": round(1000 * r["system"], 2),
                    "runs": len(r["times"]),
                }
                for r in data["results"]
            },
        }
    finally:
        procs.stop_all()


# ----------------------------------------------------------------- on the wire


def pcap_modbus(path: str, server_ports: set[int]):
    """Yields (time_s, client_port, server_port, is_request, tid, unit, fc,
    address_or_None, syn) for each Modbus TCP ADU (and each SYN) in a pcap
    of lo (Ethernet link type)."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    nanos = magic == 0xA1B23C4D
    link = struct.unpack("<I", data[20:24])[0]
    i = 24
    while i + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack("<IIII", data[i : i + 16])
        pkt = data[i + 16 : i + 16 + incl]
        i += 16 + incl
        t = sec + frac / (1e9 if nanos else 1e6)
        off = 14 if link == 1 else 16  # Ethernet, or Linux cooked
        if len(pkt) < off + 20 or pkt[off] >> 4 != 4 or pkt[off + 9] != 6:
            continue
        ip = off
        tcp = ip + (pkt[ip] & 0x0F) * 4
        sport, dport = struct.unpack(">HH", pkt[tcp : tcp + 4])
        flags = pkt[tcp + 13]
        payload = pkt[tcp + (pkt[tcp + 12] >> 4) * 4 :]
        if dport in server_ports:
            client, server, request = sport, dport, True
        elif sport in server_ports:
            client, server, request = dport, sport, False
        else:
            continue
        if flags & 0x02 and request:  # SYN from the client
            yield (t, client, server, True, None, None, None, None, True)
        j = 0
        while j + 8 <= len(payload):
            tid, _, length, unit, fc = struct.unpack(">HHHBB", payload[j : j + 8])
            address = None
            if request and j + 10 <= len(payload):
                address = struct.unpack(">H", payload[j + 8 : j + 10])[0]
            yield (t, client, server, request, tid, unit, fc, address, False)
            j += 6 + length


def wire_polls(path: str, server_ports: set[int]) -> dict:
    """From a capture: per request round trips; per DTSU666 poll (first
    request of a meter's poll to the reply of its last read, on one
    connection); per burst (a connection's requests and replies with no
    gap over 200 ms: one bus slot of the gateway, one whole invocation of a
    one-shot tool), from its first request, and from the SYN when the
    capture saw the connection open."""
    pending: dict[tuple[int, int, int], tuple[float, int, int]] = {}
    poll_start: dict[tuple[int, int, int], float] = {}
    syn: dict[tuple[int, int], float] = {}
    bursts: dict[tuple[int, int], list] = {}  # conn -> [first_request, last_reply, syn]
    rtts, polls, burst_times, from_syn, requests = [], [], [], [], []
    last = DTSU666_READS[-1][0]

    def close_burst(conn):
        first, last_reply, syn_t = bursts.pop(conn)
        if last_reply is not None:
            burst_times.append(1000 * (last_reply - first))
            if syn_t is not None:
                from_syn.append(1000 * (last_reply - syn_t))

    for t, client, server, request, tid, unit, fc, address, is_syn in pcap_modbus(path, server_ports):
        conn = (client, server)
        if is_syn:
            syn[conn] = t
            continue
        if request:
            burst = bursts.get(conn)
            if burst is not None and t - (burst[1] or burst[0]) > 0.2:
                close_burst(conn)
                burst = None
            if burst is None:
                bursts[conn] = [t, None, syn.pop(conn, None)]
            pending[(client, server, tid)] = (t, unit, address)
            requests.append((fc, address))
            if address == DTSU666_READS[0][0]:
                poll_start[(client, server, unit)] = t
            continue
        sent = pending.pop((client, server, tid), None)
        if sent is None:
            continue
        if conn in bursts:
            bursts[conn][1] = t
        rtts.append(1000 * (t - sent[0]))
        if sent[2] == last and (client, server, sent[1]) in poll_start:
            polls.append(1000 * (t - poll_start.pop((client, server, sent[1]))))
    for conn in list(bursts):
        close_burst(conn)
    return {
        "requests": len(rtts),
        "request_kinds": sorted({f"FC{fc:02d}@{a:#06x}" for fc, a in requests if a is not None}),
        "rtt": summary(rtts),
        "poll": summary(polls),
        "burst": summary(burst_times),
        "syn_to_last_reply": summary(from_syn),
    }


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    values = sorted(values)
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 3),
        "p90_ms": round(values[int(0.9 * (len(values) - 1))], 3),
        "p99_ms": round(values[int(0.99 * (len(values) - 1))], 3),
        "max_ms": round(values[-1], 3),
    }


def capture(tmp: str, name: str, ports: list[int]) -> tuple[subprocess.Popen, str]:
    path = os.path.join(tmp, f"{name}.pcap")
    expression = " or ".join(f"tcp port {p}" for p in ports)
    proc = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-s", "128", "-w", path, "--immediate-mode", expression],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    # tcpdump says "listening on lo" once the capture runs.
    while True:
        line = proc.stderr.readline()
        if not line or b"listening on" in line:
            return proc, path


def stop_capture(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wire_phase(args, tmp: str, layout: dict, ports: list[int]) -> dict:
    procs = Processes()
    result = {}
    try:
        wait_for_quiet_machine(args.max_wait)
        broker_port = free_ports(1)[0]
        start_ingest(procs, tmp, broker_port, "-wire")
        start_sim(procs, tmp, layout["scenario_start_ms"], len(ports), "-wire")
        config = write_gateway_config(tmp, broker_port, "gw-wire.buffer.redb")
        gateway = procs.start(
            "gateway", [GATEWAY_BIN, "--config", config],
            os.path.join(tmp, "gateway-wire.log"), stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(args.warmup)
        tcpdump, path = capture(tmp, "gateway", ports)
        time.sleep(args.wire_secs)
        stop_capture(tcpdump)
        procs.stop(gateway)
        result["gateway"] = wire_polls(path, set(ports))

        commands = single_poll_commands(ports[0])
        for name, cmd in commands.items():
            tcpdump, path = capture(tmp, name, [ports[0]])
            for _ in range(args.wire_invocations):
                subprocess.run(cmd, shell=True, stdout=subprocess.DEVNULL, check=True)
            stop_capture(tcpdump)
            result[name] = wire_polls(path, {ports[0]})
        return result
    finally:
        procs.stop_all()


# ---------------------------------------------------------------- reporting


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(args, layout: dict, runs: list[dict], hyper: dict | None, wire: dict | None) -> str:
    out = []
    out.append(
        f"Load: {len(layout['meters'])} DTSU666 meters, {len(set(p for _, p, _ in layout['meters']))} "
        f"Modbus TCP endpoints, {layout['lines']} lines, poll interval {args.interval} s; "
        f"warm-up {args.warmup} s, window {args.measure} s.\n"
    )
    out.append(
        "| run | gateway CPU (% of one core) | CPU per sample | peak RSS (VmHWM) | RSS at end | samples/s "
        "(ok) | samples per meter | interval median / max | sim CPU | ingest CPU | rest of machine |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        out.append(
            f"| {r['run']} | {r['gateway_cpu_pct']:.2f} % | {r['gateway_cpu_us_per_sample']} µs | "
            f"{r['gateway_vmhwm_kb']:,} KB | "
            f"{r['gateway_vmrss_kb']:,} KB | {r['samples_per_s']} ({r['samples_ok_in_window']:,} of "
            f"{r['samples_in_window']:,} ok) | {r['samples_per_meter_min']}-{r['samples_per_meter_max']} "
            f"({r['meters_seen']} meters) | {r['interval_median_ms']} / {r['interval_max_ms']} ms | "
            f"{r['sim_cpu_pct']} % | {r['ingest_cpu_pct']} % | {r['others_pct_of_one_core']} % |"
        )
    if runs:
        out.append(
            f"| **median** | **{median_of(runs, 'gateway_cpu_pct'):.2f} %** | "
            f"{median_of(runs, 'gateway_cpu_us_per_sample')} µs | "
            f"**{median_of(runs, 'gateway_vmhwm_kb'):,.0f} KB** | {median_of(runs, 'gateway_vmrss_kb'):,.0f} KB | "
            f"**{median_of(runs, 'samples_per_s')}** | | | {median_of(runs, 'sim_cpu_pct')} % | "
            f"{median_of(runs, 'ingest_cpu_pct')} % | {median_of(runs, 'others_pct_of_one_core')} % |"
        )
    if hyper:
        out.append("\nOne poll of one meter, process start-up included (hyperfine):\n")
        out.append("| command | median | mean ± σ | min | user | sys | runs |")
        out.append("|---|---|---|---|---|---|---|")
        for name, r in hyper["results"].items():
            out.append(
                f"| {name} | **{r['median_ms']} ms** | {r['mean_ms']} ± {r['stddev_ms']} ms | "
                f"{r['min_ms']} ms | {r['user_ms']} ms | {r['system_ms']} ms | {r['runs']} |"
            )
        for name, cmd in hyper["commands"].items():
            out.append(f"\n- {name}: `{cmd}`")
    if wire:
        out.append("\nOn the wire (tcpdump on lo), median / p99 / max:\n")
        out.append(
            "| who | requests seen | request round trip | one meter poll (3 requests) "
            "| burst (gateway: one bus slot; tools: one connection) | SYN to last reply |"
        )
        out.append("|---|---|---|---|---|---|")
        for name, w in wire.items():
            def cell(s):
                return "-" if not s else f"{s['median_ms']} / {s['p99_ms']} / {s['max_ms']} ms (n={s['n']})"
            out.append(
                f"| {name} | {w['requests']} ({', '.join(w['request_kinds'])}) | {cell(w['rtt'])} | "
                f"{cell(w['poll'])} | {cell(w['burst'])} | {cell(w['syn_to_last_reply'])} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="load runs (default 3)")
    parser.add_argument("--warmup", type=float, default=10, help="seconds before measuring")
    parser.add_argument("--measure", type=float, default=60, help="measured window, seconds")
    parser.add_argument(
        "--rss-every", type=float, default=0,
        help="also record the gateway's VmRSS every N s of the window (results.json, log)",
    )  # fmt: skip
    parser.add_argument("--servers", type=int, default=20, help="Modbus TCP endpoints")
    parser.add_argument("--units", type=int, default=10, help="meters per endpoint (even)")
    parser.add_argument("--interval", type=int, default=1, help="poll_interval_secs")
    parser.add_argument("--hf-warmup", type=int, default=10)
    parser.add_argument("--hf-runs", type=int, default=100)
    parser.add_argument("--wire-secs", type=float, default=10, help="gateway capture length")
    parser.add_argument("--wire-invocations", type=int, default=30)
    parser.add_argument("--max-wait", type=float, default=3600, help="wait for cargo at most")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--no-load", action="store_true", help="skip the load runs")
    parser.add_argument("--no-single", action="store_true", help="skip hyperfine and tcpdump")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if args.units % 2:
        parser.error("--units must be even (a stenter and a fan per line)")

    check_decoder()
    if not args.no_build:
        log("cargo build --release --workspace --bins")
        subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="facwatch-bench-")
    log(f"temp dir {tmp}")
    ports = free_ports(args.servers)
    layout = write_plant(tmp, ports, args.units, args.interval)
    subprocess.run(
        [GATEWAY_BIN, "check-config", "--config", write_gateway_config(tmp, 1883, "check.redb")],
        check=True, stdout=sys.stderr,
    )  # fmt: skip

    runs, hyper, wire = [], None, None
    try:
        if not args.no_load:
            for i in range(1, args.runs + 1):
                runs.append(load_run(args, tmp, layout, ports, i))
        if not args.no_single:
            missing = [t for t in ("hyperfine", "mbpoll", "tcpdump") if shutil.which(t) is None]
            if missing:
                raise RuntimeError(f"missing {', '.join(missing)} (apt-get install -y ...)")
            hyper = hyperfine_phase(args, tmp, layout, ports)
            wire = wire_phase(args, tmp, layout, ports)
    finally:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump({"args": vars(args), "runs": runs, "hyperfine": hyper, "wire": wire}, f, indent=1)
        text = report(args, layout, runs, hyper, wire)
        print(text)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
