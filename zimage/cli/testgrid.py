"""`zimage testgrid --run-dir DIR`: render a test grid (one prompt, chosen LoRAs at several strengths).

The Compare page queues these jobs; the scheduler starts this command detached. DIR holds config.json
(see zimage.testgrid for its fields); the images, grid.png and progress are written into DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("testgrid", help="render one prompt with LoRAs / checkpoints at several strengths")
    p.add_argument("--run-dir", required=True, help="job folder holding config.json")
    p.set_defaults(handler=run)


def run(args) -> int:
    from zimage.errors import UserError
    from zimage.runfolder import RunFolder
    from zimage.settings import get_settings
    from zimage.testgrid import run_grid

    run_dir = Path(args.run_dir).expanduser().resolve()
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--run-dir {run_dir}: no config.json there")
    code = run_grid(run_dir, get_settings())
    status = RunFolder(run_dir).read_status()
    if code == 0:
        print(f"{status.get('state')}: {run_dir / 'grid.png'}")
    else:
        print(f"error: {status.get('error')}", file=sys.stderr)
    return code
