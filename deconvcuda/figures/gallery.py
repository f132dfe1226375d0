"""The analyses' figures in the gallery's ``out/index.html``, beside ``visualize``'s layers.

    add_to_gallery(out, "occlusion", "Occlusion", body_html, files)

Each analysis owns one section of the page (and one link in its navigation), between marker comments,
so running it again replaces its section and running another analysis adds one. Where no
``index.html`` exists yet, one is started from the gallery's template. Every file written is recorded
in the gallery's manifest (``figures.record_outputs``), so the next ``visualize`` run starts clean;
an analysis's own earlier figures are removed when it runs again.
"""
from __future__ import annotations

import datetime
import html
import os
import platform
import re
import string
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence, Tuple, Union

import torch

__all__ = ["add_to_gallery", "clear_previous", "figure_html"]

PathLike = Union[str, os.PathLike]


def figure_html(path: PathLike, out: PathLike, caption: str) -> str:
    """One figure of a section: the PNG (relative to ``out``) and its caption (HTML)."""
    relative = Path(os.path.relpath(Path(path), Path(out))).as_posix()
    return (f'<figure class="analysis"><img src="{html.escape(relative)}" alt="{html.escape(Path(path).stem)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def clear_previous(out: PathLike, folder: str) -> None:
    """Remove the files an earlier run recorded under ``out/folder/`` (nothing else is touched)."""
    from ..figures import MANIFEST

    out = Path(out)
    manifest = out / MANIFEST
    if not manifest.is_file():
        return
    root = (out / folder).resolve()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        path = (out / line).resolve()
        if line and root in path.parents and path.is_file():
            path.unlink()


def _markers(key: str) -> Tuple[str, str, str, str]:
    return (f"<!-- deconvcuda:{key} -->", f"<!-- /deconvcuda:{key} -->",
            f"<!-- deconvcuda:{key}:nav -->", f"<!-- /deconvcuda:{key}:nav -->")


def _new_page(title: str, rows: Sequence[Tuple[str, str]]) -> str:
    """An index.html with no layers yet, from the gallery's own template."""
    from .. import __version__

    template = string.Template((resources.files("deconvcuda") / "templates" / "index.html").read_text("utf-8"))
    rows = list(rows) + [
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("versions", f"deconvcuda {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                     f"{platform.system()} {platform.machine()}")]
    page = template.safe_substitute(
        title=html.escape(title),
        header="\n".join(f"  <dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in rows),
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
                   header: Sequence[Tuple[str, str]] = ()) -> Path:
    """Put ``body`` (HTML) as the section ``title`` of ``out/index.html``, replacing the section an
    earlier run of ``key`` left there; record ``files`` and the page in the gallery's manifest.
    header: (name, value) rows for a page that does not exist yet. Returns the page's path."""
    from ..figures import record_outputs

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
