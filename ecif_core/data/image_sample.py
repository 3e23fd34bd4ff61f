"""Whether a pair source's images exist, checked on a bounded sample: a wrong image folder
(every path relative to the wrong place) shows up in seconds, before an audit decodes them."""
from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

from ecif_core.data.images import TAR_MEMBER, image_ref
from ecif_core.data.remote import is_url
from ecif_core.data.sources import image_base
from ecif_core.data.formats import Source, read_pair_rows, source_of
from ecif_core.data.storage import location

SAMPLE_SIZE = 200


@dataclass
class ImageSample:
    checked: int                      # local images looked at (URLs are fetched by the audit, not here)
    missing: int
    missing_examples: list[str] = dataclass_field(default_factory=list)  # at most 3 resolved paths

    def problem(self, field: str) -> str | None:
        """One line when images are missing, naming a sample path; None when all were found."""
        if not self.missing:
            return None
        return (f"{self.missing} of {self.checked} sampled images not found, e.g. {self.missing_examples[0]} (image paths "
                f"resolve against the folder of the {field} file)")


def sample_rows(rows: int, size: int = SAMPLE_SIZE) -> set[int]:
    """Row numbers (1-based) spread evenly over `rows` rows, at most `size` of them."""
    if rows <= size:
        return set(range(1, rows + 1))
    return {1 + round(i * (rows - 1) / (size - 1)) for i in range(size)}


def check_image_sample(source: "str | Path | dict | Source", field: str, rows: int,
                       size: int = SAMPLE_SIZE) -> ImageSample:
    """Stat the images of up to `size` rows spread over the source (`rows`: its row count, from
    validate_source); one streaming pass, no image opened."""
    source = source_of(source, field)
    wanted = sample_rows(rows, size)
    base = image_base(source, None, field)
    last = max(wanted, default=0)
    checked, missing = 0, []
    for number, row in read_pair_rows(source, field):
        if number > last:
            break
        image = row.get("image")
        if number not in wanted or not isinstance(image, str) or not image.strip() or is_url(image):
            continue
        checked += 1
        ref = image_ref(base, image.strip())
        path = location(ref.split(TAR_MEMBER, 1)[0])
        if not path.is_file():
            missing.append(str(path))
    return ImageSample(checked, len(missing), missing[:3])
