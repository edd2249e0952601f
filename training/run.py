"""Process entry of one training run:

    accelerate launch [--num_processes N] [--cpu] -m training.run --config runs/<id>/config.json [--export DIR]

The config's `method` picks the method file. A run resumes from its latest complete checkpoint.
Exit codes: 0 finished, 3 stopped early (signal or time budget; resumable), 2 bad config.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import load_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a JSON config written by training.config.save_json")
    ap.add_argument("--export", default=None, help="write the trained model here when the run finishes")
    args = ap.parse_args(argv)
    try:
        cfg = load_json(args.config)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.method == "dmd2":
        from .methods import dmd2

        result = dmd2.train(cfg)
        if result["finished"] and args.export and result["accelerator"].is_main_process:
            dmd2.export(result, cfg, args.export)
    elif cfg.method == "msd":
        from .methods import msd

        result = msd.train(cfg)
        if result["finished"] and args.export:
            msd.export(result, args.export)
    elif cfg.method == "controlnet":
        from .methods import controlnet

        result = controlnet.train(cfg)
        if result["finished"] and args.export:
            controlnet.export(result["controlnet"], args.export)
    elif cfg.method == "nct":
        from .methods import nct

        result = nct.train(cfg)
        if result["finished"] and args.export:
            nct.export(result["adapter"], cfg, args.export)
    elif cfg.method == "tiny_decoder":
        from .methods import tiny_decoder

        result = tiny_decoder.train(cfg)
        if result["finished"] and args.export:
            tiny_decoder.export(result["model"], args.export)
    else:
        from .methods import clip, teacher, vae

        result = {"clip": clip, "vae": vae, "teacher": teacher}[cfg.method].train(cfg)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}
    print(json.dumps({"method": cfg.method, **summary}), flush=True)
    return 0 if result["finished"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
