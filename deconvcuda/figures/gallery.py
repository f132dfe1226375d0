"""The gallery: ``out/index.html`` and the folder it lives in.

    out = prepare_output("out")                  # what the previous run wrote there is removed
    page = index_html(title, header, records, out, rules, k, images)          # visualize's page
    add_to_gallery(out, "occlusion", "Occlusion", body_html, files, header)  # an analysis's section

``visualize`` writes the page afresh: its header, one section per layer, and any extra
:class:`Section`. Each other command owns one section of that page (and one link in its
navigation), between marker comments, so running it again replaces its section and running another
command adds one; where no ``index.html`` exists yet, one is started from the same template
(``deconvcuda/templates/index.html``). Every file written is listed in the folder's manifest
(:data:`MANIFEST`, :func:`record_outputs`), so the next ``visualize`` run starts clean, and a command
that runs again removes its own earlier files first (:func:`clear_previous`).

Adding a section for a new command: write its PNGs under ``out/<key>/``, call
``clear_previous(out, key)`` before and ``add_to_gallery(out, key, title, body, files, header)``
after, with ``body`` HTML built from :func:`figure_html` (see ``deconvcuda/cli/occlusion.py``).
"""
from __future__ import annotations

import datetime
import html
import os
import platform
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .._version import __version__
from .records import ChannelFigure, LayerFigures
from .render import OUTLINE_SHARE, OVERVIEW_CHANNELS

__all__ = ["Section", "prepare_output", "record_outputs", "clear_previous", "slug", "index_html", "add_to_gallery",
           "figure_html", "run_details", "MANIFEST"]

PathLike = Union[str, os.PathLike]
Rows = Sequence[Tuple[str, str]]

#: The file in the output folder that lists what the last run wrote, so the next run can remove it.
MANIFEST = ".deconvcuda-files"


@dataclass
class Section:
    """An extra part of the gallery's index.html (e.g. occlusion maps, invariance curves): ``title`` goes
    into the navigation, ``body`` is HTML placed under it as it is (links to other pages, figures)."""

    title: str
    body: str
    anchor: Optional[str] = None            # the section's id; derived from the title where None


# --------------------------------------------------------------------------------------------- #
# The output folder: each run removes what the previous one wrote
# --------------------------------------------------------------------------------------------- #

def _listed(out: Path, root: Path) -> Iterator[Path]:
    """The files the manifest of ``out`` lists inside the folder ``root`` (resolved paths)."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    root = root.resolve()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        path = (out / line).resolve()
        if line and root in path.parents:
            yield path


def prepare_output(out: Union[str, os.PathLike]) -> Path:
    """Create ``out`` and remove every file the previous run listed in its manifest (and the folders
    that leaves empty), so a gallery never shows figures of an earlier run. Files deconvcuda did not
    write are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"visualize: out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    folders = set()
    for path in _listed(out, root):
        if path.is_file():
            path.unlink()
        folders.update(parent for parent in path.parents if root in parent.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (out / MANIFEST).unlink(missing_ok=True)
    return out


def record_outputs(out: Union[str, os.PathLike], paths: Iterable[Union[str, os.PathLike]]) -> None:
    """Add ``paths`` (files inside ``out``) to the manifest that the next run's ``prepare_output``
    removes. Commands that add pages to a gallery call this for each file they write."""
    out = Path(out)
    with open(out / MANIFEST, "a", encoding="utf-8") as manifest:
        manifest.writelines(_relative(Path(path), out) + "\n" for path in paths)


def slug(text: str) -> str:
    """``text`` as a file name: runs of characters other than letters, digits, ".", "_" and "-" become
    one "_" ("output" where nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "output"


def clear_previous(out: PathLike, folder: str) -> None:
    """Remove the files an earlier run recorded under ``out/folder/`` (nothing else is touched)."""
    out = Path(out)
    for path in _listed(out, out / folder):
        if path.is_file():
            path.unlink()


# --------------------------------------------------------------------------------------------- #
# The page
# --------------------------------------------------------------------------------------------- #

def run_details() -> List[Tuple[str, str]]:
    """The header's last rows: when the page was written and with which versions."""
    return [("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
            ("versions", f"deconvcuda {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                         f"{platform.system()} {platform.machine()}")]


def _template() -> string.Template:
    return string.Template((resources.files("deconvcuda") / "templates" / "index.html").read_text("utf-8"))


def _header_html(rows: Rows) -> str:
    return "\n".join(f"  <dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in rows)


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _channel_list(channels: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts, start = [], None
    for i, channel in enumerate(channels):
        if start is None:
            start = channel
        if i + 1 == len(channels) or channels[i + 1] != channel + 1:
            parts.append(str(start) if start == channel else f"{start}-{channel}")
            start = None
    return ", ".join(parts)


def _layer_anchor(number: int) -> str:
    return f"layer-{number}"


def _channel_anchor(number: int, channel: int) -> str:
    return f"layer-{number}-channel-{channel}"


def _caption(figure: ChannelFigure, record: LayerFigures, k: int, images: Optional[int], out: Path,
             optimized: Optional[str] = None) -> str:
    """The channel's title, what its optimized image reaches (``optimized``: what that value is, where
    the figure has one) and a table of its activations, each with its unit."""
    title = f"<b>{html.escape(figure.layer)} &middot; channel {figure.channel}</b>"
    count = len(figure.values)
    if count < k:
        among = f" of the {images} images" if images is not None else ""
        title += (f'<br><span class="few">only {count}{among} activate{"s" * (count == 1)} this channel '
                  f"(an activation &gt; 0), so {count} of the {k} cells are filled</span>")
    if optimized is not None and figure.optimized_value is not None:
        alone = html.escape(_relative(figure.optimized, out))
        title += (f'<br><span class="optimized">optimized image (right; <a href="{alone}">alone</a>): '
                  f"{html.escape(optimized)} reaches {figure.optimized_value:.4g} there</span>")
    map_text = ("&times;".join(str(v) for v in record.map_size) + " map") if record.map_size else "output"
    rows = []
    for rank, (value, name, (y, x), (top, left, bottom, right)) in enumerate(
            zip(figure.values, figure.image_names, figure.positions, figure.boxes), start=1):
        rows.append(f"<tr><td>{rank}</td><td>{value:.4g}</td><td>{html.escape(name)}</td><td>({y}, {x})</td>"
                    f"<td>{top}..{bottom - 1}, {left}..{right - 1}</td></tr>")
    table = ('<table class="acts"><thead><tr><th>#</th><th>activation</th><th>image</th>'
             f"<th>(y, x) in the {map_text}</th><th>rows, columns of input pixels</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    return title + table


def _layer_section(number: int, record: LayerFigures, count: int, out: Path, k: int, images: Optional[int],
                   optimized: Optional[str] = None) -> str:
    anchor = _layer_anchor(number)
    links = ['<a href="#top">top</a>']
    if number > 0:
        links.append(f'<a href="#{_layer_anchor(number - 1)}">&larr; previous layer</a>')
    if number + 1 < count:
        links.append(f'<a href="#{_layer_anchor(number + 1)}">next layer &rarr;</a>')
    height, width = record.receptive_field
    shape = ("&times;".join(str(v) for v in record.map_size) + " positions") if record.map_size else "a flat output"
    parts = [f'<section class="layer" id="{anchor}">',
             f'<h2>{html.escape(record.layer)} <span class="layer-nav">{" &middot; ".join(links)}</span></h2>',
             f'<p class="about">{record.num_channels} channels, each a map of {shape}; an activation sees a '
             f"{height}&times;{width}-pixel receptive field of the input"
             + (f", neighbouring positions {record.stride[0]} pixel{'s' * (record.stride[0] != 1)} apart"
                if any(record.stride) else "")
             + f". Time: top-{k} scan {record.seconds.get('top_activations', 0):.1f} s, projections "
             f"{record.seconds.get('project', 0):.1f} s, drawing {record.seconds.get('draw', 0):.1f} s"
             + (f", optimized images {record.seconds['synthesize']:.1f} s" if "synthesize" in record.seconds else "")
             + ".</p>"]
    drawn = len(record.channels)
    parts.append(f'<p class="about">Drawn: {drawn} channel{"s" * (drawn != 1)}'
                 + (f" ({_channel_list(record.channels)})" if drawn else "") + ".</p>")
    if record.silent:
        parts.append(f'<p class="silent">Silent in these images (no activation &gt; 0 anywhere, so nothing to '
                     f"draw): {len(record.silent)} of {record.num_channels} channels: "
                     f"{_channel_list(record.silent)}.</p>")
    if record.overview is not None:
        shown = min(len(record.figures), OVERVIEW_CHANNELS)
        parts.append(f'<figure class="overview"><img src="{html.escape(_relative(record.overview, out))}" '
                     f'alt="overview of {html.escape(record.layer)}"><figcaption>Overview: the first {shown} channels '
                     "drawn, each labelled with its number.</figcaption></figure>")
    if record.figures:
        jumps = " ".join(f'<a href="#{_channel_anchor(number, figure.channel)}">{figure.channel}</a>'
                         for figure in record.figures)
        parts.append(f'<p class="jump">Channels: {jumps}</p>')
    parts.append('<div class="channels">')
    for figure in record.figures:
        parts.append(f'<figure class="channel" id="{_channel_anchor(number, figure.channel)}">'
                     f'<img src="{html.escape(_relative(figure.path, out))}" '
                     f'alt="{html.escape(figure.layer)} channel {figure.channel}">'
                     f"<figcaption>{_caption(figure, record, k, images, out, optimized)}</figcaption></figure>")
    parts.append("</div></section>")
    return "\n".join(parts)


def _section_anchor(section: Section, number: int) -> str:
    return section.anchor or f"section-{number}-" + (re.sub(r"[^a-z0-9]+", "-", section.title.lower()).strip("-")
                                                     or "more")


def index_html(title: str, header: Rows, records: Sequence[LayerFigures], out: Path, rules: Sequence[str], k: int,
               images: Optional[int], sections: Sequence[Section] = (), optimized: Optional[str] = None) -> str:
    """``visualize``'s page: ``header`` rows (then :func:`run_details`), how to read the figures, one
    section per layer record, and the extra ``sections``. images: how many the scan read (for captions).
    optimized: where the figures end in an optimized image, what the value in its caption is (e.g.
    "the mean of the channel's map")."""
    nav = [f'<a href="#{_layer_anchor(number)}">{html.escape(record.layer)}</a>' for number, record in enumerate(records)]
    extra_nav, extra = [], []
    for number, section in enumerate(sections):
        anchor = _section_anchor(section, number)
        extra_nav.append(f'<a href="#{html.escape(anchor)}">{html.escape(section.title)}</a>')
        extra.append(f'<section class="extra" id="{html.escape(anchor)}"><h2>{html.escape(section.title)}</h2>\n'
                     f"{section.body}\n</section>")
    grids = " then ".join(f"<i>{html.escape(rule)}</i>" for rule in rules)
    how = (f"Per channel, its {k} strongest activations over the images (at most one per image, strongest "
           f"first, row by row), projected back to pixel space: one grid per rule ({grids}), then the "
           "image patches they came from, each the activation's receptive field, with the region holding "
           f"{OUTLINE_SHARE:.0%} of the {html.escape(rules[0])} projection outlined in yellow"
           + ("; then the channel's <i>optimized image</i>, an input made to drive the channel up "
              "(<code>deconvcuda.synthesize</code>, as the header says), not a photo" if optimized else "")
           + ". Light gray in a "
           "patch is outside the image. Gray in a projection is zero. In each caption: <i>activation</i> is the "
           "layer's output value (after the layer: only values &gt; 0 are drawn); <i>(y, x)</i> is its position "
           "in the layer's output map, in map cells; the last column is the receptive field in input pixels "
           "(rows, columns; inclusive, may reach past the image).")
    return _template().substitute(
        title=html.escape(title),
        header=_header_html(list(header) + run_details()),
        how=how,
        nav=" &middot; ".join(nav),
        extra_nav=(" &middot; More: " + " &middot; ".join(extra_nav)) if extra_nav else "",
        sections="\n".join(_layer_section(number, record, len(records), out, k, images, optimized)
                           for number, record in enumerate(records)) + "\n" + "\n".join(extra))


# --------------------------------------------------------------------------------------------- #
# The other commands' sections
# --------------------------------------------------------------------------------------------- #

def figure_html(path: PathLike, out: PathLike, caption: str) -> str:
    """One figure of a section: the PNG (relative to ``out``) and its caption (HTML)."""
    relative = _relative(Path(path), Path(out))
    return (f'<figure class="analysis"><img src="{html.escape(relative)}" alt="{html.escape(Path(path).stem)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _markers(key: str) -> Tuple[str, str, str, str]:
    return (f"<!-- deconvcuda:{key} -->", f"<!-- /deconvcuda:{key} -->",
            f"<!-- deconvcuda:{key}:nav -->", f"<!-- /deconvcuda:{key}:nav -->")


def _new_page(title: str, rows: Rows) -> str:
    """An index.html with no layers yet, from the gallery's template."""
    page = _template().safe_substitute(
        title=html.escape(title),
        header=_header_html(list(rows) + run_details()),
        how="The analyses of the paper's Section 4 (occlusion, invariance, feature evolution); run "
            "<code>deconvcuda visualize</code> for the top-k projections of whole layers.",
        nav="(none yet)", extra_nav="", sections="")
    # what the template asks for and only visualize knows (its layers' details) stays empty here
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", page)


def _replace_or_insert(page: str, start: str, end: str, block: str, before: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(page):
        return pattern.sub(lambda _: block, page, count=1)
    at = page.rfind(before)
    if at < 0:
        return page + block
    return page[:at] + block + page[at:]


def add_to_gallery(out: PathLike, key: str, title: str, body: str, files: Iterable[PathLike],
                   header: Rows = ()) -> Path:
    """Put ``body`` (HTML) as the section ``title`` of ``out/index.html``, replacing the section an
    earlier run of ``key`` left there; record ``files`` and the page in the gallery's manifest.
    header: (name, value) rows for a page that does not exist yet. Returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    page = index.read_text(encoding="utf-8") if index.is_file() else _new_page(f"deconvcuda: {title}", header)
    start, end, nav_start, nav_end = _markers(key)
    anchor = f"analysis-{key}"
    section = (f'{start}\n<section class="extra" id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}\n'
               f"</section>\n{end}\n")
    link = f'{nav_start} &middot; <a href="#{anchor}">{html.escape(title)}</a>{nav_end}'
    page = _replace_or_insert(page, start, end, section, "</body>")
    page = _replace_or_insert(page, nav_start, nav_end, link, "</nav>")
    index.write_text(page, encoding="utf-8")
    record_outputs(out, list(files) + [index])
    return index
