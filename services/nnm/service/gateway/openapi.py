"""Write the gateway's OpenAPI document: `python -m nnm.service.gateway.openapi [PATH]`."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parents[4] / "api_schemas" / "openapi.json"


def build_openapi(data_dir: Path) -> dict[str, Any]:
    """The OpenAPI document of an app built on embedded settings in `data_dir` (nothing is started)."""
    from ..context import ServiceContext
    from ..settings import load_settings
    from .app import create_app

    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=data_dir))

    class NoQueue:
        def enqueue(self, job_id: str, queue: str, delay_s: float = 0) -> None: ...
        def ping(self) -> None: ...
        def close(self) -> None: ...
        def pending_job_ids(self) -> set[str] | None: ...

    spec = create_app(ctx, NoQueue(), reconcile_interval_s=0).openapi()
    ctx.close()
    return json.loads(json.dumps(spec))


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    with tempfile.TemporaryDirectory() as tmp:
        spec = build_openapi(Path(tmp))
    path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
