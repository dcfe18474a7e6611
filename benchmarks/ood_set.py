"""Builds, offline, a set of pictures that are NOT chest X-rays, to measure the input guard on.

Sources: scikit-image's and scikit-learn's sample images (and sklearn's digits), matplotlib's
sample data (photos, an MRI slice, elevation and bathymetry grids, stock prices, EEG traces),
pydicom's bundled test DICOMs (CT, MR, ultrasound, nuclear medicine), rendered text pages and
charts, noise, gradients and patterns. Each source picture is written in up to four variants: gray
and colour (a colour map for gray data, the luminance for colour photos), each at its native size
and squashed to 224 x 224 (as the public X-ray data is).

`manifest.csv` (path, source, group, family, colour, size, split): `split` is `tune` (choose
thresholds on it) or `report` (measure on it), decided per source *group* (the data a picture is
rendered from), so no variant or rendering of a report picture is ever seen while tuning. Within
each family the groups are ordered by a hash of their name and alternate, so both halves hold
every family and the split never changes between runs or machines.

    python benchmarks/ood_set.py [--out ~/.cache/pneumoscope/ood]
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import shutil
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

import pneumoscope
from common import parser, read_ood_manifest

SQUASHED = 224  # the public chest X-ray data is squashed to this square
COLUMNS = ("path", "source", "group", "family", "colour", "size", "split")


@dataclass(frozen=True)
class Source:
    name: str  # one source picture
    family: str
    load: Callable[[], np.ndarray | Path]  # HxW (any dtype), HxWx3/4 uint8, or a DICOM file
    group: str = ""  # pictures rendered from the same data share a group (and so a split)
    cmap: str = "viridis"  # how a gray picture is coloured for its colour variant

    @property
    def split_key(self) -> str:
        return self.group or self.name


# ------------------------------------------------------------------ pixels helpers
def to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretches any 2-D array (int16 MRI, float elevations) to 0-255."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        low, high = values.min(), values.max() + 1e-9
    return np.round(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def colourise(gray: np.ndarray, cmap: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](gray / 255.0)[..., :3] * 255).round().astype(np.uint8)


def rgb_of(image: np.ndarray) -> np.ndarray:
    """HxWx3/4 -> HxWx3 (alpha composited on white, as a browser shows a transparent logo)."""
    if image.ndim == 3 and image.shape[2] == 4:
        pil = Image.fromarray(image, "RGBA")
        background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, pil).convert("RGB"))
    return image


def render(draw: Callable, size: tuple[float, float] = (8.27, 11.69), dpi: int = 100) -> np.ndarray:
    """Draws on a fresh Agg figure (no pyplot state) and returns its RGB pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    draw(figure)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def sample_data(name: str):
    import matplotlib.cbook as cbook

    return cbook.get_sample_data(name)


def sample_file(name: str) -> Path:
    import matplotlib.cbook as cbook

    return Path(cbook.get_sample_data(name, asfileobj=False))


# ------------------------------------------------------------------ sources
def skimage_source(name: str, family: str, cmap: str = "viridis") -> Source:
    def load():
        import skimage.data

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = getattr(skimage.data, name)()
        return image.astype(np.uint8) * 255 if image.dtype == bool else image
    return Source(f"skimage-{name}", family, load, cmap=cmap)


def pydicom_source(name: str, cmap: str = "bone") -> Source:
    def load():
        from pydicom.data import get_testdata_file

        return Path(get_testdata_file(name))
    return Source(f"dicom-{Path(name).stem}", "medical", load, cmap=cmap)


WORDS = ("the of and to in is was for on with as by at from that this which patient results were data "
         "analysis model method figure table value sample group study between after before each model "
         "report section page measured observed significant mean error rate time first second").split()


def text_page(seed: int, columns: int, font_size: int, family: str = "serif") -> Callable[[], np.ndarray]:
    def load():
        rng = np.random.default_rng(seed)
        words = rng.choice(WORDS, 900)
        width = 90 // columns
        lines = textwrap.wrap(" ".join(words), width)

        def draw(figure):
            figure.text(0.08, 0.95, f"Report {seed}: findings and methods", size=font_size + 6, weight="bold",
                        family=family, va="top")
            per_column = int(0.85 * 11.69 * 72 / (font_size * 1.3))
            for c in range(columns):
                chunk = lines[c * per_column:(c + 1) * per_column]
                figure.text(0.08 + c * 0.86 / columns, 0.9, "\n".join(chunk), size=font_size, family=family,
                            va="top", linespacing=1.3)
        return render(draw)
    return load


def chart(kind: str, seed: int) -> Callable[[], np.ndarray]:
    def load():
        rng = np.random.default_rng(seed)

        def draw(figure):
            ax = figure.add_subplot()
            if kind == "line":
                ax.plot(np.cumsum(rng.normal(size=(300, 3)), axis=0))
                ax.set(title="Random walks", xlabel="step", ylabel="value")
            elif kind == "bar":
                ax.bar(list("ABCDEFGH"), rng.integers(5, 50, 8), color="tab:blue")
                ax.set(title="Counts per group", ylabel="count")
            elif kind == "scatter":
                x = rng.normal(size=400)
                ax.scatter(x, 2 * x + rng.normal(size=400), s=8, alpha=0.6)
                ax.set(title="Scatter", xlabel="x", ylabel="y")
            elif kind == "histogram":
                ax.hist(rng.gamma(2.0, 2.0, 2000), bins=40, color="tab:orange")
                ax.set(title="Histogram")
            elif kind == "pie":
                ax.pie(rng.integers(5, 30, 5), labels=list("abcde"), autopct="%1.0f%%")
            elif kind == "heatmap":
                image = ax.imshow(rng.normal(size=(12, 12)).cumsum(0), cmap="coolwarm")
                figure.colorbar(image)
            elif kind == "stock":
                prices = sample_data("goog.npz")["price_data"]
                ax.plot(prices["date"], prices["adj_close"])
                ax.set(title="GOOG adjusted close", ylabel="USD")
                ax.grid(True)
            elif kind == "eeg":
                with sample_data("eeg.dat") as handle:
                    eeg = np.frombuffer(handle.read(), dtype="<f8").reshape(800, 4)
                for row in range(4):
                    ax.plot(np.arange(800) / 100, eeg[:, row] + 4 * row, lw=0.8, color="k")
                ax.set(title="EEG", xlabel="time (s)", yticks=[])
            elif kind == "box":
                ax.boxplot([rng.normal(m, 1 + m / 3, 100) for m in range(5)])
                ax.set(title="Box plot")
            ax.figure.tight_layout()
        return render(draw, size=(6.4, 4.8))
    return load


def noise(kind: str, seed: int, shape: tuple[int, int] = (512, 512)) -> Callable[[], np.ndarray]:
    def load():
        rng = np.random.default_rng(seed)
        if kind == "uniform":
            return rng.integers(0, 256, shape, dtype=np.uint8)
        if kind == "gaussian":
            return to_uint8(rng.normal(128, 40, shape))
        if kind == "salt-pepper":
            image = np.full(shape, 128, np.uint8)
            mask = rng.random(shape)
            image[mask < 0.1], image[mask > 0.9] = 0, 255
            return image
        if kind == "clouds":  # smoothed noise: soft blobs, the closest noise gets to an X-ray's haze
            from scipy.ndimage import gaussian_filter

            return to_uint8(gaussian_filter(rng.normal(size=shape), sigma=seed * 6))
        raise ValueError(kind)
    return load


def pattern(kind: str, size: int = 512) -> Callable[[], np.ndarray]:
    def load():
        y, x = np.mgrid[0:size, 0:size] / (size - 1)
        r = np.hypot(x - 0.5, y - 0.5)
        values = {
            "gradient-horizontal": x, "gradient-vertical": y, "gradient-diagonal": (x + y) / 2,
            "gradient-radial": r, "checkerboard-8": ((x * size // 8 + y * size // 8) % 2),
            "checkerboard-64": ((x * size // 64 + y * size // 64) % 2), "circles": np.sin(r * 60) > 0,
            "grating": np.sin(x * 40 * np.pi) * 0.5 + 0.5,
        }[kind]
        return to_uint8(values.astype(np.float64))
    return load


def digits(indices: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_digits

        images = load_digits().images  # 8 x 8, values 0-16
        if len(indices) == 1:
            return (images[indices[0]] * 255 / 16).round().astype(np.uint8)  # native 8 x 8
        tiles = np.pad(images[list(indices)], ((0, 0), (1, 1), (1, 1)))  # a sheet of 10 x 10 px cells
        sheet = tiles.reshape(10, -1, 10, 10).transpose(0, 2, 1, 3).reshape(100, -1)
        return (sheet * 255 / 16).round().astype(np.uint8)
    return load


def mri_slice() -> np.ndarray:
    with sample_data("s1045.ima.gz") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":  # older matplotlib hands out the gzip bytes undecompressed
        raw = gzip.decompress(raw)
    return np.frombuffer(raw, np.uint16).reshape(256, 256)


def hillshade(elevation: np.ndarray) -> np.ndarray:
    from matplotlib.colors import LightSource

    return LightSource(azdeg=315, altdeg=45).hillshade(np.asarray(elevation, np.float64), vert_exag=0.05)


def sources() -> list[Source]:
    photo = ["astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "clock", "coins", "moon",
             "hubble_deep_field"]
    result = [skimage_source(name, "photo") for name in photo]
    result += [skimage_source(name, "texture") for name in ("brick", "grass", "gravel")]
    result += [skimage_source(name, "graphic") for name in ("logo", "colorwheel", "horse", "binary_blobs")]
    result += [skimage_source(name, "document") for name in ("page", "text")]
    result += [skimage_source(name, "medical", "magma") for name in
               ("retina", "microaneurysms", "cell", "immunohistochemistry", "shepp_logan_phantom")]

    def sklearn_image(index):
        def load():
            from sklearn.datasets import load_sample_images

            return load_sample_images().images[index]
        return load
    result += [Source("sklearn-china", "photo", sklearn_image(0)), Source("sklearn-flower", "photo", sklearn_image(1))]

    def mpl_image(name):
        return lambda: np.asarray(Image.open(sample_file(name)))
    result += [Source("mpl-grace_hopper", "photo", mpl_image("grace_hopper.jpg")),
               Source("mpl-blue_pack", "photo", mpl_image("Minduka_Present_Blue_Pack.png")),
               Source("mpl-logo2", "graphic", mpl_image("logo2.png"))]

    topo = lambda: sample_data("topobathy.npz")["topo"]  # noqa: E731
    dem = lambda: sample_data("jacksboro_fault_dem.npz")["elevation"]  # noqa: E731
    result += [Source("mpl-topobathy", "map", topo, group="topobathy", cmap="terrain"),
               Source("mpl-topobathy-hillshade", "map", lambda: hillshade(topo()), group="topobathy", cmap="gray"),
               Source("mpl-jacksboro_dem", "map", dem, group="jacksboro", cmap="terrain"),
               Source("mpl-jacksboro-hillshade", "map", lambda: hillshade(dem()), group="jacksboro", cmap="gray"),
               Source("mpl-bivariate_normal", "map",
                      lambda: np.load(sample_file("axes_grid/bivariate_normal.npy")), cmap="RdBu"),
               Source("mpl-topobathy-contours", "map", lambda: render(lambda f: f.add_subplot().contour(
                   topo()[::-1], 20, cmap="terrain"), size=(6.4, 4.8)), group="topobathy")]

    result += [Source("mpl-mri_s1045", "medical", mri_slice, cmap="bone")]
    result += [pydicom_source(name) for name in
               ("CT_small.dcm", "693_J2KI.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm",
                "examples_palette.dcm", "examples_rgb_color.dcm", "examples_jpeg2k.dcm", "examples_ybr_color.dcm",
                "image_dfl.dcm")]

    result += [Source(f"text-page-{seed}", "document", text_page(seed, columns, size, family))
               for seed, columns, size, family in ((1, 1, 11, "serif"), (2, 2, 9, "serif"), (3, 1, 14, "sans-serif"),
                                                   (4, 2, 10, "sans-serif"), (5, 1, 8, "monospace"),
                                                   (6, 3, 7, "serif"))]
    result += [Source(f"chart-{kind}", "chart", chart(kind, seed)) for seed, kind in
               enumerate(("line", "bar", "scatter", "histogram", "pie", "heatmap", "stock", "eeg", "box"))]
    result += [Source(f"noise-{kind}-{seed}", "noise", noise(kind, seed), cmap="viridis")
               for kind, seed in (("uniform", 1), ("uniform", 2), ("gaussian", 1), ("gaussian", 2),
                                  ("salt-pepper", 1), ("salt-pepper", 2), ("clouds", 1), ("clouds", 3))]
    result += [Source(f"pattern-{kind}", "pattern", pattern(kind)) for kind in
               ("gradient-horizontal", "gradient-vertical", "gradient-diagonal", "gradient-radial",
                "checkerboard-8", "checkerboard-64", "circles", "grating")]
    result += [Source("digits-0", "digits", digits((0,))), Source("digits-7", "digits", digits((7,))),
               Source("digits-grid-a", "digits", digits(tuple(range(100)))),
               Source("digits-grid-b", "digits", digits(tuple(range(100, 200))))]
    return result


# ------------------------------------------------------------------ variants and split
def variants(source: Source, out: Path) -> Iterator[tuple[Path, str, str]]:
    """Writes the source's variants; yields (path, colour, size) for each."""
    loaded = source.load()
    if isinstance(loaded, Path):  # a DICOM file: the native gray variant is the file itself
        from pydicom import dcmread  # lazy, as every source's library: only what a build reads
        from pydicom.pixels import pixel_array

        native = out / f"{source.name}.dcm"
        shutil.copyfile(loaded, native)
        yield native, "gray", "native"
        gray = pneumoscope.read_xray(loaded)  # what prediction sees
        # an RGB ultrasound keeps its own colours (pydicom hands out RGB, first frame); gray pictures,
        # a palette's too, get the colour map
        in_colour = int(dcmread(loaded, stop_before_pixels=True).get("SamplesPerPixel") or 1) == 3
        colour = np.asarray(pixel_array(loaded, index=0), np.uint8) if in_colour else colourise(gray, source.cmap)
    else:
        image = np.asarray(loaded)
        if image.ndim == 3:
            colour = rgb_of(image)
            gray = np.asarray(Image.fromarray(colour).convert("L"))
        else:
            gray = image if image.dtype == np.uint8 else to_uint8(image)
            colour = colourise(gray, source.cmap)
        yield save(gray, out / f"{source.name}-gray-native.png"), "gray", "native"
    yield save(squash(gray), out / f"{source.name}-gray-224.png"), "gray", "224"
    if colour is not None:
        yield save(colour, out / f"{source.name}-colour-native.png"), "colour", "native"
        yield save(squash(colour), out / f"{source.name}-colour-224.png"), "colour", "224"


def squash(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((SQUASHED, SQUASHED), Image.Resampling.BILINEAR))


def save(pixels: np.ndarray, path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with pneumoscope.atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def assign_splits(all_sources: list[Source]) -> dict[str, str]:
    """group -> tune/report: within each family, groups sorted by a hash of their name alternate."""
    splits: dict[str, str] = {}
    for family in sorted({s.family for s in all_sources}):
        groups = sorted({s.split_key for s in all_sources if s.family == family},
                        key=lambda g: hashlib.sha256(g.encode()).hexdigest())
        splits.update({g: ("tune", "report")[i % 2] for i, g in enumerate(groups)})
    return splits


def build(out: Path) -> Path:
    all_sources = sources()
    splits = assign_splits(all_sources)
    rows = []
    for source in all_sources:
        for path, colour, size in variants(source, out):
            rows.append({"path": path.name, "source": source.name, "group": source.split_key,
                         "family": source.family, "colour": colour, "size": size,
                         "split": splits[source.split_key]})
    manifest = out / "manifest.csv"
    with pneumoscope.atomic_write(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main() -> None:
    options = parser(__doc__)
    options.add_argument("--out", type=Path, default=pneumoscope.default_cache_dir() / "ood",
                         help="folder to write (default: %(default)s)")
    args = options.parse_args()
    manifest = build(args.out)
    rows = read_ood_manifest(manifest)
    families = sorted({r["family"] for r in rows})
    print(f"{len(rows)} pictures from {len({r['source'] for r in rows})} sources -> {manifest}")
    for family in families:
        mine = [r for r in rows if r["family"] == family]
        print(f"  {family:9s} {len(mine):4d} pictures, {len({r['source'] for r in mine}):3d} sources "
              f"(tune {sum(r['split'] == 'tune' for r in mine)}, report {sum(r['split'] == 'report' for r in mine)})")


if __name__ == "__main__":
    main()
