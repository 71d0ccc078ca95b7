"""A load-generator process holding many nodes' streams, as the edge runtime opens them.

Each stream is a websocket to ``/agent/v1/nodes/<id>/stream`` with the node's bearer credential (the
``websockets`` client the runtime uses). Once every stream is open the process writes ``READY`` to its
ready file; then each nudge that arrives is parsed, its desired state's signature verified with the
pinned key and its addressee checked, as a node does before applying it, and the time it arrived is kept.
The process writes what it saw (``time.time()`` of each nudge, by node) when told to stop (SIGTERM) or
when every node got the number of nudges it waits for.

Run by the benchmark as ``python -m benchmarks.nudge.streams SPEC OUT READY``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import websockets

from edge_runtime import protocol, signing

OPEN_CONCURRENCY = 32
OPEN_TIMEOUT_S = 30.0


async def _hold(spec: dict[str, Any], ready: Path) -> dict[str, Any]:
    key = signing.public_key_from_b64(spec["public_key"])
    seen: dict[str, list[float]] = {node["node_id"]: [] for node in spec["nodes"]}
    problems: list[str] = []
    opened: list[Any] = []
    done = asyncio.Event()
    want = spec["nudges_each"]
    complete = 0
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def listen(ws: Any, node_id: str) -> None:
        nonlocal complete
        async for message in ws:
            arrived = time.time()
            nudge = protocol.Nudge.model_validate_json(message)
            if nudge.desired is None:
                problems.append(f"{node_id}: a nudge without its state")
            else:
                state = signing.verify_desired_state(nudge.desired, key)
                if state.node_id != node_id:
                    problems.append(f"{node_id}: a state addressed to {state.node_id}")
            seen[node_id].append(arrived)
            if len(seen[node_id]) == want:
                complete += 1
                if complete == len(seen):
                    done.set()

    async def open_one(node: dict[str, str]) -> None:
        async with limit:
            ws = await websockets.connect(f"{spec['ws_url']}/agent/v1/nodes/{node['node_id']}/stream",
                                          additional_headers={"Authorization": f"Bearer {node['credential']}"},
                                          open_timeout=OPEN_TIMEOUT_S, max_size=64 * 1024)
        opened.append(ws)
        asyncio.create_task(listen(ws, node["node_id"]))

    await asyncio.gather(*(open_one(node) for node in spec["nodes"]))
    ready.write_text("READY")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    for ws in opened:
        await ws.close()
    return {"seen": seen, "problems": problems[:20], "problem_count": len(problems)}


def main(argv: list[str]) -> int:
    spec_path, out_path, ready = Path(argv[0]), Path(argv[1]), Path(argv[2])
    out_path.write_text(json.dumps(asyncio.run(_hold(json.loads(spec_path.read_text()), ready))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
