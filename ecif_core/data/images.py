"""Images of pairs: where a row's image is, whether it can be used, and loading batches.

An image is a file (relative to its pair file; on a disk or in an object store, storage.py),
a member of a webdataset shard ("<shard.tar>::<member>"), or an http(s) URL read from the
audit's fetched copy. Every
failure of checking a row's image is that row's reason, never an exception.
"""
from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ecif_core.data.confine import (HARD_LINKS_HINT, HardLinked, OutsideRoots, check_location, check_opened, confined, open_confined,
                      open_regular)
from ecif_core.errors import EcifError
from ecif_core.data.remote import FetchError, RemoteImages, fetch, fetched_path, is_url
from ecif_core.data.shards import open_tar
from ecif_core.data.storage import identity, is_remote, location, read_bytes

if TYPE_CHECKING:
    from ecif_core.data.pairs import Pair

MAX_IMAGE_BYTES = 64 * 2**20        # a larger file is rejected before it is opened
MAX_IMAGE_PIXELS = 64_000_000       # decompression bombs: width x height above this is rejected
TAR_MEMBER = "::"                    # an image inside a webdataset shard: "<shard.tar>::<member>"


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def hard_link_reason(exc: HardLinked) -> str:
    """A rejected row's reason for an image that is a hard link (it names the setting)."""
    return f"image is a hard link ({exc.names} names; another may be a file outside the data roots): {HARD_LINKS_HINT}"


@dataclass(frozen=True)
class ImageAccess:
    """Where images may come from: local data roots (None: anywhere) and, when the manifest
    opts in, http(s) URLs under `remote`, fetched into `fetch_dir` (the audit folder's copy);
    `private_hosts`: the host:port keys the operator opened to non-public addresses."""

    roots: Sequence[Path] | None = None
    remote: RemoteImages | None = None
    fetch_dir: Path | None = None
    private_hosts: frozenset[str] = frozenset()


def image_ref(base: Path, image: str) -> str:
    """The resolved image path, keeping the member of a shard ("<shard.tar>::<member>"); a URL as is."""
    if is_url(image):
        return image
    member = image.split(TAR_MEMBER, 1)[1] if TAR_MEMBER in image else None
    path = str(_resolve(base, image))
    return path if member is None else f"{path}{TAR_MEMBER}{member}"


def _resolve(base: Path, image: str) -> Path:
    """The image's file (for an image inside a tar shard: the shard)."""
    image = image[len("file://"):] if image.startswith("file://") else image
    name = image.split(TAR_MEMBER)[0]
    if is_remote(name):
        return location(name, "image")
    if is_remote(base):
        return location(f"{base}/{name}", "image")
    return (base / name).resolve()


def row_image_problem(image: object, base: Path, check_images: bool, access: ImageAccess | None,
                      stat_images: bool = True) -> str | None:
    """Why a row's image cannot be used, or None. `base`: the pair file's folder; `check_images`:
    decode it (fetching a URL once); `stat_images=False`: the image file is not touched."""
    if not isinstance(image, str) or not image.strip():
        return "image is empty"
    if is_url(image):
        return _url_problem(image.strip(), check_images and stat_images, access)
    image_roots = access.roots if access else None
    if not stat_images and image_roots is None:
        return None  # resolving is a system call per row: skipped when nothing is checked on disk
    # The shard of a tar member resolves against the pair file, like any image path; the
    # checks and the open below all use this one reference, never the raw relative text.
    ref = image_ref(base, image)
    path = location(ref.split(TAR_MEMBER, 1)[0])
    try:
        confined(path, image_roots, "image")
    except OutsideRoots:
        return "image outside the data roots"
    if not stat_images:
        return None
    if not path.is_file():
        return f"image not found: {path}"
    if TAR_MEMBER in ref and not ref.split(TAR_MEMBER, 1)[1]:
        return "image names no member of its shard"
    if check_images:
        return _image_problem(ref, image_roots)
    return None


def _url_problem(url: str, fetch_now: bool, access: ImageAccess | None) -> str | None:
    """Policy check; with `fetch_now`, fetch once into the fetch folder and check the bytes."""
    if access is None or access.remote is None:
        return "http(s) image URLs need the manifest's remote_images opt-in"
    problem = access.remote.host_problem(url)
    if problem or not fetch_now:
        return problem
    if access.fetch_dir is None:
        return "http(s) image URLs are read only by an audit (it keeps a copy in its folder)"
    local = fetched_path(access.fetch_dir, url)
    if not local.is_file():
        try:
            fetch(url, access.remote, local, access.private_hosts)
        except FetchError as exc:
            return str(exc)
    return _image_problem(str(local), None)  # the audit's own copy, outside the data roots


def local_image(image: str, fetch_dir: Path | None) -> str:
    """The file to open for a pair's image: a URL's fetched copy, else the image itself."""
    if is_url(image):
        if fetch_dir is None:
            raise EcifError(f"image {image} is a URL and no fetched copy is available")
        return str(fetched_path(fetch_dir, image))
    return image


def _image_problem(path: "Path | str", roots: Sequence[Path] | None) -> str | None:
    """Why the image cannot be used, or None; every failure of reading or decoding it is a
    reason (a row's fault never escapes as an exception)."""
    try:
        data = image_bytes(str(path), roots, max_bytes=MAX_IMAGE_BYTES)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: a bomb is refused before it is decoded
            if width * height > MAX_IMAGE_PIXELS:
                return f"image too large ({width}x{height} pixels; limit {MAX_IMAGE_PIXELS})"
            img.load()  # a full decode: verify() alone lets truncated files through
    except _TooLarge as exc:
        return f"image file too large ({exc.size} bytes; limit {MAX_IMAGE_BYTES})"
    except HardLinked as exc:
        return hard_link_reason(exc)
    except OutsideRoots:
        return "image outside the data roots"
    except KeyError:
        return f"image not found in its shard: {str(path).split(TAR_MEMBER, 1)[-1]}"
    except Image.DecompressionBombError as exc:
        return f"image too large ({exc})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"image cannot be decoded: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decoder's own bug on a hostile file is still this row's fault
        return f"image cannot be decoded: {type(exc).__name__}: {exc}"
    return None


def _open_image(path: "Path | str", roots: Sequence[Path] | None = None) -> Image.Image:
    """A file, or a member of a webdataset shard, read into memory (one image) from the file
    checked as opened (confine.open_confined)."""
    return Image.open(io.BytesIO(image_bytes(str(path), roots)))


def image_bytes(image: str, roots: Sequence[Path] | None = None, max_bytes: int | None = None) -> bytes:
    """The stored bytes of an image file or of a member of a webdataset shard; with `roots`,
    the file (the shard) is checked against them now, by its real path, and as opened (a
    hard link is refused unless the roots allow it). Over `max_bytes`: _TooLarge, unread."""
    if TAR_MEMBER in image:
        shard, member = image.split(TAR_MEMBER, 1)
        tar = _open_shard(shard, roots)
        info = tar.getmember(member)  # KeyError: no such member
        _check_size(info.size, max_bytes)
        handle = tar.extractfile(info)
        if handle is None:
            raise OSError(f"{member} is not a file in {shard}")
        return handle.read()
    if is_remote(image):
        real = confined(image, roots, "image")
        if max_bytes is not None:
            _check_size(real.stat().st_size, max_bytes)
        return read_bytes(real)  # one GET
    with open_confined(image, roots, "image") as handle:
        _check_size(os.fstat(handle.fileno()).st_size, max_bytes)
        return handle.read()


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise _TooLarge(size)


def _open_shard(shard: str, roots: Sequence[Path] | None = None) -> tarfile.TarFile:
    """An open shard (by its real path, confined now), reopened when the file was replaced
    (keyed by its mtime and size); the open file is checked for hard links at every use."""
    real = confined(shard, roots, "image")
    tar = _tar(str(real), identity(real))
    if not is_remote(real):
        check_location(tar.fileobj, roots, "image", shard)
        check_opened(tar.fileobj, roots, "image", shard)
    return tar


@functools.lru_cache(maxsize=16)
def _tar(shard: str, _identity: tuple) -> tarfile.TarFile:
    """Open shards stay open (per process): a batch reads many members of the same shard. A local
    one is opened as a regular file (never blocks on a FIFO); where it lies is checked by the caller."""
    if is_remote(shard):
        return open_tar(shard)
    return open_tar(open_regular(shard, None, "image", shard))


def load_image(path: str, roots: Sequence[Path] | None = None) -> Image.Image:
    """RGB as the model sees it: EXIF orientation applied, transparency composited on white
    (as img2dataset does), grayscale / CMYK / palette converted. `path` may name a member of
    a webdataset shard ("<shard.tar>::<member>"); with `roots` it is confined when opened."""
    with _open_image(path, roots) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")


def load_batch(pairs: "Sequence[Pair]", preprocess: Callable, tokenizer: Callable,
               fetch_dir: Path | None = None, roots: Sequence[Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) tensors for a batch, with the model's own transform and tokenizer;
    URL images come from their copies in `fetch_dir`; local ones are confined to `roots`
    again now (a file swapped for a symlink after prepare is refused, never read)."""
    return batch_tensors(pairs, load_batch_images(pairs, fetch_dir, roots), preprocess, tokenizer)


def load_batch_images(pairs: "Sequence[Pair]", fetch_dir: Path | None = None,
                      roots: Sequence[Path] | None = None) -> list[Image.Image]:
    """The batch's decoded images, once, so two models (audited and reference) share one read."""
    images = []
    for pair in pairs:
        try:
            images.append(load_image(local_image(pair.image, fetch_dir)) if is_url(pair.image)
                          else load_image(pair.image, roots))
        except HardLinked as exc:
            raise EcifError(f"pair {pair.id!r}: image {pair.image} is a hard link now "
                            f"(changed after prepare; not read): {exc.message}") from None
        except OutsideRoots as exc:
            raise EcifError(f"pair {pair.id!r}: image {pair.image} is outside the data roots now "
                            f"(changed after prepare; not read): {exc.message}") from None
        except (OSError, ValueError, SyntaxError, KeyError) as exc:  # changed on disk after prepare validated it
            raise EcifError(f"pair {pair.id!r}: image {pair.image} cannot be loaded ({exc})") from exc
    return images


def batch_tensors(pairs: "Sequence[Pair]", images: Sequence[Image.Image], preprocess: Callable,
                  tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) for one model: its own transform and tokenizer."""
    return torch.stack([preprocess(image) for image in images]), tokenizer([p.caption for p in pairs])
