"""Command line: `python -m evit_kernels info`, `python -m evit_kernels bench --model efficientvit_b1` and
`python -m evit_kernels predict --model efficientvit_b1 --batch 256`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evit_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="versions, GPU, compiled extension and usable backends per op")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    p_bench = sub.add_parser("bench", help="time a real model: eager vs torch.compile vs patched")
    p_bench.add_argument("--model", default="efficientvit_b1",
                         help="timm name (efficientvit_b0..b3, l1..l3, m0..m5), efficientvit-sam-l0/l1/l2/xl0/xl1, "
                         "or sana-600m / sana-1600m / sana-video-2b (one transformer call on the latents) / "
                         "dc-ae-f32c32-decode")
    p_bench.add_argument("--batch", type=int, default=8)
    p_bench.add_argument("--res", type=int, nargs=2, metavar=("H", "W"), default=None,
                         help="input size (default 224 224; 512 512 for SAM encoders; 1024 1024 for Sana and DC-AE, "
                         "whose input is the latent of that image; 480 832 for SANA-Video, 81 frames)")
    p_bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                         help="default bf16 on a GPU, fp32 on CPU")
    p_bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p_bench.add_argument("--compile-mode", default="default",
                         help="torch.compile mode (default, max-autotune, ...)")
    p_bench.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p_bench.add_argument("--warmup", type=int, default=3)
    p_bench.add_argument("--iters", type=int, default=10)
    p_bench.add_argument("--json", metavar="PATH", help="also save the numbers as JSON")

    p_predict = sub.add_parser("predict", help="predicted GPU time, eager vs patched, per launch (no GPU needed)")
    p_predict.add_argument("--model", default="efficientvit_b1", help="as for bench")
    p_predict.add_argument("--batch", type=int, default=256)
    p_predict.add_argument("--res", type=int, nargs=2, metavar=("H", "W"), default=None,
                           help="input size (default 224 224; 512 512 for SAM encoders; 1024 1024 for Sana and DC-AE, "
                         "whose input is the latent of that image; 480 832 for SANA-Video, 81 frames)")
    p_predict.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    p_predict.add_argument("--gpu", choices=["h100", "h200"], default="h100")
    p_predict.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw",
                           help="memory format of the model's weights and input")
    p_predict.add_argument("--ptxas", default=None, help="ptxas of a CUDA toolkit (default: $CUDA_HOME/bin/ptxas)")
    p_predict.add_argument("--json", metavar="PATH", help="also save every launch and the totals as JSON")

    args = parser.parse_args(argv)
    if args.command == "info":
        from evit_kernels.info import format_info, info

        report = info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))
        return 0

    from evit_kernels import bench

    res = tuple(args.res) if args.res else bench.default_res(args.model)
    if args.command == "predict":
        from evit_kernels import model_prediction

        ptxas = args.ptxas or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")
        prediction = model_prediction.predict_model(args.model, args.batch, res, args.dtype, args.gpu, ptxas,
                                                    args.layout)
        print(model_prediction.format_prediction(prediction))
        if args.json:
            model_prediction.save_json(prediction, args.json)
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    compile_mode = None if args.no_compile else args.compile_mode
    report = bench.run(args.model, args.batch, res, dtype, device, compile_mode, args.warmup, args.iters)
    print(bench.format_report(report))
    if args.json:
        bench.save_json(report, args.json)
    return 0 if all(r.agrees for r in report.results) else 1


if __name__ == "__main__":
    sys.exit(main())
