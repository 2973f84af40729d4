"""Training-step throughput of ResNet-18 on this CPU: fp32 vs bf16 autocast vs channels-last.

    python benchmarks/train_step.py [--sizes 224 160 128] [--batch 32] [--steps 3]

Measured once per configuration in one run, so the ratios between rows are what count.
This is what chose bf16 autocast + channels-last for `cxr-batch train` on CPUs with AVX512_BF16.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    print("| size | mode | images/s |\n| ---: | --- | ---: |")
    for size in args.sizes:
        for mode in ("fp32", "bf16", "channels_last", "channels_last+bf16"):
            cl = mode.startswith("channels_last")
            fmt = torch.channels_last if cl else torch.contiguous_format
            m = model.to(memory_format=fmt)
            x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=fmt)
            y = torch.randint(0, 3, (args.batch,))

            def step(
                m: torch.nn.Module = m, x: torch.Tensor = x, y: torch.Tensor = y, bf16: bool = "bf16" in mode
            ) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rate = args.batch * args.steps / (time.perf_counter() - t)
            print(f"| {size} | {mode} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
