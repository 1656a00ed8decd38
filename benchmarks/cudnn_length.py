"""How long a sequence PyTorch's cuDNN ``nn.RNN`` takes, against PyTorch without cuDNN.

    python benchmarks/cudnn_length.py

On a CUDA machine: ``nn.RNN(4, 16, tanh)``, one sequence, forward under
``torch.inference_mode()``, TF32 off; for each length the median of 3 calls after a
warm-up, with cuDNN and with ``torch.backends.cudnn.enabled = False`` (PyTorch's own
CUDA loop). cuDNN refused lengths of 65,536 and more on an H200
(``CUDNN_STATUS_NOT_SUPPORTED``; see benchmarks/results/h200-2026-11-27/).
"""

from __future__ import annotations

import time

import torch

LENGTHS = (10_000, 30_000, 65_535, 65_536, 100_000)


def main() -> None:
    torch.backends.cudnn.allow_tf32 = False
    module = torch.nn.RNN(4, 16).cuda()
    for length in LENGTHS:
        x = torch.randn(length, 1, 4, device="cuda").contiguous()
        for use_cudnn in (True, False):
            torch.backends.cudnn.enabled = use_cudnn
            name = "cudnn" if use_cudnn else "native"
            try:
                with torch.inference_mode():
                    module(x)
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(3):
                        start = time.perf_counter()
                        module(x)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                print(length, name, sorted(times)[1] * 1e3, "ms", flush=True)
            except RuntimeError as err:
                print(length, name, "ERR", str(err)[:80], flush=True)


if __name__ == "__main__":
    main()
