"""Model server throughput against its baselines, measured in one run.

For a small MLP and a small CNN:

(a) raw onnxruntime in process at its best batch size (rows/s);
(b) the model server over HTTP, concurrency 1 and 32, JSON and binary bodies;
(c) a naive server on the same HTTP stack: one ``session.run`` per request;
(d) a no-op endpoint on the same server (the HTTP stack's ceiling).

Servers run in a subprocess (uvicorn + uvloop + httptools); the load
generator speaks keep-alive HTTP/1.1 over raw asyncio streams so that the
client costs as little as possible. Usage::

    .venv/bin/python -m benchmarks.inference.run [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.harness import free_port, machine, write_report
from tests.edge_runtime import onnx_models as om

SERVER = r'''
import asyncio, sys, uvloop
from pathlib import Path
from edge_runtime.serving import ModelRegistry
from edge_runtime.serving.app import OIPApp
from edge_runtime.serving.server import run_server
mode, model_dir, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

class Naive(OIPApp):
    """Same parsing and HTTP, but one session.run per request, no batching."""
    async def infer(self, scope, receive, name, version):
        served = self._resolve(name, version)
        body = await self._read_body(receive, dict(scope["headers"]))
        request, feeds, wanted = self._parse(served, body, dict(scope["headers"]))
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self.registry.executor, served.model.run, feeds)
        return self._respond(served, request, outputs, wanted)

async def main():
    registry = ModelRegistry()
    for path in sorted(model_dir.glob("*.onnx")):
        await registry.load(path.stem, "1", path, max_batch_size=64)
    handle = await run_server(registry, "127.0.0.1", port)
    app = Naive(registry) if mode == "naive" else handle.app
    async def routed(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/noop":
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await app(scope, receive, send)
    handle._server.config.app = routed
    handle._server.config.loaded_app = routed
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
'''


def request_bytes(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


async def one_connection(port: int, payload: bytes, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            counts[0] += 1
    finally:
        writer.close()


def load(port: int, payload: bytes, concurrency: int, seconds: float) -> float:
    async def go() -> float:
        counts = [0]
        await asyncio.gather(*(one_connection(port, payload, time.perf_counter() + 0.3, [0])
                               for _ in range(concurrency)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one_connection(port, payload, started + seconds, counts) for _ in range(concurrency)))
        return counts[0] / (time.perf_counter() - started)

    import uvloop

    return float(uvloop.run(go()))


def payloads(name: str, x: np.ndarray) -> dict[str, bytes]:
    path = f"/v2/models/{name}/infer"
    js = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                 "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    return {
        "json": request_bytes(path, js, {"Content-Type": "application/json"}),
        "binary": request_bytes(path, header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}),
        "noop": request_bytes("/noop", js, {}),
    }


def raw_rows_per_second(path: Path, x1: np.ndarray, seconds: float) -> tuple[float, int]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    best, best_batch = 0.0, 1
    for batch in (1, 8, 32, 64):
        x = np.repeat(x1, batch, axis=0)
        session.run(None, {"x": x})
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 4:
            session.run(None, {"x": x})
            n += batch
        rate = n / (time.perf_counter() - started)
        if rate > best:
            best, best_batch = rate, batch
    return best, best_batch


def start_server(mode: str, model_dir: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(model_dir), str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the benchmark server did not start")
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="edgewise-inference-bench-"))
    models = {"mlp": (om.mlp(model_dir / "mlp.onnx", features=32, hidden=64, outputs=8),
                      np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32)),
              "cnn": (om.cnn(model_dir / "cnn.onnx", size=32, filters=16),
                      np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32))}
    report: dict[str, Any] = {"machine": machine(), "seconds": args.seconds, "models": {}}
    for name, (path, x) in models.items():
        raw, batch = raw_rows_per_second(path, x, args.seconds)
        report["models"][name] = {"raw_ort_rows_per_s": round(raw), "raw_best_batch": batch}
    for mode in ("batched", "naive"):
        proc, port = start_server(mode, model_dir)
        try:
            for name, (_, x) in models.items():
                p = payloads(name, x)
                entry = report["models"][name]
                for conc in (1, 32):
                    for body in ("json", "binary") if mode == "batched" else ("json",):
                        entry[f"{mode}_{body}_c{conc}"] = round(load(port, p[body], conc, args.seconds))
                    if mode == "batched":
                        entry[f"noop_c{conc}"] = round(load(port, p["noop"], conc, args.seconds))
        finally:
            proc.terminate()
            proc.wait(10)
    for entry in report["models"].values():
        entry["ratio_binary_c32_vs_raw"] = round(entry["batched_binary_c32"] / entry["raw_ort_rows_per_s"], 3)
        entry["ratio_json_c32_vs_noop"] = round(entry["batched_json_c32"] / entry["noop_c32"], 3)
        entry["ratio_json_c32_vs_naive"] = round(entry["batched_json_c32"] / entry["naive_json_c32"], 3)
    print(json.dumps(report, indent=2))
    print(f"written to {write_report('inference', report, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
