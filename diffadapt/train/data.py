"""Images in, batches out: reading and checking the folders, the DreamBooth dataset (instance images, and class
images batched with them for prior preservation), the per-rank batch order, and class-image generation.

Every random choice (order, crop, flip) is a pure function of (seed, epoch, index), not of a global RNG, so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would, on any number of processes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DiffAdaptError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class TrainInputError(DiffAdaptError, ValueError):
    """A training option, folder or image that cannot work; raised before any model is loaded."""


def rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for one (seed, keys…) tuple."""
    return np.random.default_rng([seed, *keys])


def torch_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> 1)


def list_images(folder: str | Path, *, what: str, allow_missing: bool = False) -> list[Path]:
    path = Path(folder).expanduser()
    if not path.exists():
        if allow_missing:
            return []
        raise TrainInputError(f"{what} {path}: no such folder")
    if not path.is_dir():
        raise TrainInputError(f"{what} {path}: not a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images and not allow_missing:
        raise TrainInputError(f"{what} {path}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def check_images(paths: list[Path]) -> None:
    """Decode every image once so a corrupt file is named now, not hours into training."""
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise TrainInputError(f"{p}: unreadable image ({e})") from None


def open_image(path: Path) -> Image.Image:
    """RGB with the EXIF orientation applied (phone photos are stored sideways with a rotate tag)."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


@dataclass
class Prepared:
    pixels: torch.Tensor  # (3, res, res) in [-1, 1]
    original_size: tuple[int, int]  # (h, w) before resizing, for SDXL's time ids
    crop_top_left: tuple[int, int]


def prepare(img: Image.Image, *, resolution: int, center_crop: bool, flip: bool, gen: np.random.Generator
            ) -> Prepared:
    """Resize the short side to ``resolution`` (bilinear), maybe flip, crop a square — in the SDXL script's order
    (so SDXL's crop coordinates are those of the flipped image) and with the sizes of its torchvision ``Resize``
    (long side truncated) and ``CenterCrop`` (offset rounded)."""
    original = (img.height, img.width)
    short, long = sorted(img.size)
    long = int(resolution * long / short)
    size = (resolution, long) if img.width == short else (long, resolution)
    img = img.resize(size, Image.BILINEAR)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if center_crop:
        top, left = int(round((img.height - resolution) / 2.0)), int(round((img.width - resolution) / 2.0))
    else:
        top = int(gen.integers(0, img.height - resolution + 1))
        left = int(gen.integers(0, img.width - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return Prepared(pixels, original, (top, left))


class DreamBoothDataset(torch.utils.data.Dataset):
    """Items are keyed ``(index, epoch)``; with prior preservation each item also carries a class image.

    With a latent cache the item holds the VAE distribution (mean, std) instead of pixels.
    """

    def __init__(self, *, instance: list[Path], classes: list[Path], resolution: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.instance, self.classes = instance, classes
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.cache: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor, Prepared]] | None = None

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def sources(self) -> list[tuple[int, int, Path]]:
        """(kind, index, path): kind 0 instance, 1 class."""
        return [(0, i, p) for i, p in enumerate(self.instance)] + [(1, i, p) for i, p in enumerate(self.classes)]

    def fixed_crop(self, kind: int, index: int, path: Path, flip: bool) -> Prepared:
        """The crop a latent cache holds: drawn once per image (epoch-independent)."""
        return prepare(open_image(path), resolution=self.resolution, center_crop=self.center_crop, flip=flip,
                       gen=rng(self.seed, 2, kind, index))

    def _one(self, kind: int, index: int, epoch: int) -> dict:
        paths = self.instance if kind == 0 else self.classes
        j = index % len(paths)
        gen = rng(self.seed, 1, epoch, kind, index)
        flip = bool(self.random_flip and gen.random() < 0.5)
        if self.cache is not None:
            mean, std, prep = self.cache[(kind, j, flip)]
            return {"mean": mean, "std": std, "original_size": prep.original_size, "crop": prep.crop_top_left}
        prep = prepare(open_image(paths[j]), resolution=self.resolution, center_crop=self.center_crop, flip=flip,
                       gen=gen)
        return {"pixels": prep.pixels, "original_size": prep.original_size, "crop": prep.crop_top_left}

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        item = {"instance": self._one(0, index, epoch)}
        if self.classes:
            item["class"] = self._one(1, index, epoch)
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples (diffusers' layout: the loss splits the batch in two)."""
    parts = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    out = {"n_instance": len(items),
           "original_size": torch.tensor([p["original_size"] for p in parts], dtype=torch.float32),
           "crop": torch.tensor([p["crop"] for p in parts], dtype=torch.float32)}
    for key in ("pixels", "mean", "std"):
        if key in parts[0]:
            out[key] = torch.stack([p[key] for p in parts])
    return out


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch ``m`` of the whole run: epoch ``m // per_epoch``; rank ``r`` takes its slice of the epoch's
    permutation (wrapped around so every rank gets full batches)."""

    n_items: int
    batch_size: int
    world: int
    rank: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return max(1, math.ceil(self.n_items / (self.batch_size * self.world)))

    def keys(self, m: int) -> list[tuple[int, int]]:
        epoch, b = divmod(m, self.per_epoch)
        order = rng(self.seed, 0, epoch).permutation(self.n_items)
        start = (b * self.world + self.rank) * self.batch_size
        return [(int(order[k % self.n_items]), epoch) for k in range(start, start + self.batch_size)]


@dataclass(frozen=True)
class Accumulation:
    """Which micro-batches make one optimizer step, as in diffusers' scripts under accelerate: windows of
    ``steps`` micro-batches that restart at every epoch, the epoch's last window possibly shorter (accelerate
    syncs at the end of the dataloader), so an epoch is ``ceil(per_epoch / steps)`` optimizer steps."""

    per_epoch: int
    steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_epoch / self.steps)

    def first_micro(self, step: int) -> int:
        """The micro-batch that optimizer step ``step`` (0-based) starts with."""
        epoch, s = divmod(step, self.steps_per_epoch)
        return epoch * self.per_epoch + min(s * self.steps, self.per_epoch)

    def position(self, micro: int) -> tuple[int, bool]:
        """(index of ``micro`` in its window, whether it ends the window)."""
        p = micro % self.per_epoch
        return p % self.steps, (p + 1) % self.steps == 0 or p == self.per_epoch - 1


class _Sampler(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        return (self.plan.keys(m) for m in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def loader(dataset: DreamBoothDataset, plan: BatchPlan, *, start: int, stop: int, workers: int):
    """Micro-batches ``start..stop-1`` (``start`` > 0 when resuming: the data position of the checkpoint)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=_Sampler(plan, start, stop), collate_fn=collate,
                                       num_workers=workers)


def generate_class_images(pipe, *, folder: Path, prompt: str, wanted: int, have: int, batch_size: int,
                          resolution: int, seed: int, rank: int, world: int, show: bool) -> None:
    """Fill ``folder`` up to ``wanted`` images with the pipeline itself; each rank draws its share of indices,
    each image from its own seed, so the set does not depend on the number of processes."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    todo = list(range(have, wanted))[rank::world]
    bar = tqdm(total=len(todo), desc="class images", disable=not show)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(torch_seed(seed, 3, i)) for i in idx]
        with torch.no_grad():
            images = pipe(prompt=[prompt] * len(idx), generator=gens, height=resolution, width=resolution).images
        for i, image in zip(idx, images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
            tmp = folder / f".{i:05d}-{digest}.png.tmp"
            image.save(tmp, format="PNG")
            tmp.rename(folder / f"{i:05d}-{digest}.png")
        bar.update(len(idx))
    bar.close()
