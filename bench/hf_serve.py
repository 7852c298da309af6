"""`transformers serve` for a veq model directory: the peer `bench/peer.py` measures against.

    python bench/hf_serve.py MODEL_DIR [--threads N] [transformers serve options ...]

Stock `transformers serve` loads a processor with `AutoProcessor`, which resolves
`processor_config.json`'s `Qwen3VLProcessor` and then its video processor, and that needs
torchvision (whose wheels do not load against this torch; docs/design.md §7). The bundled
models serve images only, so this launcher registers the processor class they are saved from
(`veq.models.processor.ImageOnlyQwen3VLProcessor`, the same image processor and tokenizer
without the video half) as the serve command's processor loader, the one line any user of
these checkpoints would have to write, and then runs the stock command unchanged with
`MODEL_DIR` as its forced model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python bench/hf_serve.py MODEL_DIR [--threads N] [serve options ...]")
    model, rest = argv[0], argv[1:]
    if "--threads" in rest:
        i = rest.index("--threads")
        import torch

        torch.set_num_threads(int(rest[i + 1]))
        del rest[i : i + 2]

    from transformers.cli.serving import model_manager
    from transformers.cli.transformers import main as transformers_main

    from veq.models.processor import load_processor

    def load(self: object, model_id_and_revision: str, gguf_file: str | None = None) -> object:
        return load_processor(model_id_and_revision.split("@")[0])

    model_manager.ModelManager._load_processor = load  # type: ignore[method-assign]
    sys.argv = ["transformers", "serve", *rest, model]
    transformers_main()


if __name__ == "__main__":
    main(sys.argv[1:])
