"""README and ``docs/`` stand alone: every relative link resolves to a file or folder of the repository,
every ``#anchor`` to a heading of the page it names, and nothing points outside the repository."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, 'README.md')] + glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')  # links and images
FENCE = re.compile(r'^(```|~~~).*?^\1', re.S | re.M)


def links(text: str):
    """Targets of the Markdown links ``[text](target)`` and images outside code blocks and inline code."""
    text = FENCE.sub('', text)
    text = re.sub(r'`[^`\n]*`', '', text)
    return LINK.findall(text)


def anchors(path: str) -> set:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub('', open(path, encoding='utf-8').read())
    out = set()
    for heading in re.findall(r'^#{1,6}\s+(.+?)\s*#*\s*$', text, re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.replace('`', '').strip().lower()).replace(' ', '-')
        out.add(slug)
    return out


def test_the_link_checker_sees_links_and_skips_code(tmp_path):
    text = 'see [a](docs/x.md) and [b](../y.md#z "title") ![img](p.png)\n```\n[c](nowhere.md)\n```\nand `[d](no.md)`'
    assert links(text) == ['docs/x.md', '../y.md#z', 'p.png']
    page = tmp_path / 'p.md'
    page.write_text('# Evaluate and compare: `--hd95`\n```\n# not a heading\n```\n## GPU (CUDA) notes\n')
    assert anchors(str(page)) == {'evaluate-and-compare---hd95', 'gpu-cuda-notes'}


def test_there_are_docs_pages():
    names = {os.path.relpath(p, ROOT) for p in PAGES}
    for page in ('docs/README.md', 'docs/architecture.md', 'docs/methods/godc-lfam.md', 'docs/methods/ife.md',
                 'docs/methods/multi-level-structural.md', 'docs/methods/anunet.md', 'docs/methods/resunet.md',
                 'docs/commands/convert.md', 'docs/commands/evaluate-compare.md', 'docs/commands/cascade.md',
                 'docs/commands/multi-view.md', 'docs/commands/prune.md', 'docs/commands/planners.md',
                 'docs/commands/stack-slices.md'):
        assert page in names, page


@pytest.mark.parametrize('page', PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_relative_links_resolve(page):
    text = open(page, encoding='utf-8').read()
    assert '../shared' not in text and 'DESIGN.md' not in text, f'{page} points outside the repository'
    broken = []
    for target in links(text):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not resolved.startswith(ROOT + os.sep) and resolved != ROOT:
            broken.append(f'{target} (outside the repository)')
        elif not os.path.exists(resolved):
            broken.append(f'{target} (no such file)')
        elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
            broken.append(f'{target} (no heading #{anchor})')
    assert not broken, f'{os.path.relpath(page, ROOT)}: ' + ', '.join(broken)
