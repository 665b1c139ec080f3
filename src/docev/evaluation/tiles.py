"""The held-out pages' tiles read back from the eval shards, instead of decoding and tiling the pages again.

Preprocess stored every held-out record's images in ``shards/eval`` exactly as training would read them (lossless
WebP tiles, or the original bytes where those are smaller), so a question's prompt can take its images from there:
a WebP decode of the tiles instead of a page decode and two resizes, once per record however many questions it
asks. Where no usable shard exists (no held-out split preprocessed, shards of another config or tile size, a
record the overflow policy dropped, outputs only on an object store) the prompt keeps its page paths and the
transform tiles them, with the same pixels either way.
"""

from __future__ import annotations

from functools import lru_cache

from docev.config import DocEVConfig
from docev.data.dataset import ShardDataset
from docev.data.messages import Message
from docev.data.preprocess import config_hash, shards_dir
from docev.data.shards import ShardError, stored_image
from docev.evaluation.questions import Question
from docev.vision.tiling import TiledImage


class HeldOutTiles:
    """``prompt(question)``: the question's prompt with its image parts as the tiles stored for its record."""

    def __init__(self, cfg: DocEVConfig):
        self._index: dict[tuple[str, str], int] = {}
        self._dataset: ShardDataset | None = None
        folder = shards_dir(cfg, "eval")
        if not (folder / "manifest.json").is_file():
            return
        try:
            dataset = ShardDataset(folder, tile_size=cfg.tokenizer.tile_size, verify_checksums=False,
                                   expect={"config_hash": config_hash(cfg)})  # fmt: skip
        except ShardError:
            return  # built for another config or tile size: the pages are tiled again instead
        row = 0
        for f in dataset.files:
            table = f.reader().read_all()
            for source, rid in zip(table.column("source").to_pylist(), table.column("id").to_pylist(), strict=True):
                self._index[(source, rid)] = row
                row += 1
        self._dataset = dataset
        self._images = lru_cache(maxsize=32)(self._read)  # a record's questions come one after another

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, index: int) -> list[TiledImage]:
        assert self._dataset is not None
        return [stored_image(im, self._dataset.tiling) for im in self._dataset.raw(index)["images"]]

    def prompt(self, question: Question) -> list[Message]:
        index = self._index.get((question.source, question.id))
        n = sum(1 for m in question.prompt for p in m.content if p["type"] == "image")
        if index is None or n == 0:
            return list(question.prompt)
        images = self._images(index)
        if len(images) < n:
            return list(question.prompt)
        stored = iter(images[:n])  # image n of a prompt is image_files[n] of its record
        return [Message(m.role, [{**p, "content": next(stored)} if p["type"] == "image" else p for p in m.content],
                        m.masked) for m in question.prompt]  # fmt: skip
