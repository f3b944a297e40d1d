"""The docs hold together: every relative link in README.md, CHANGELOG.md and docs/**/*.md names
a file that exists, the README stays a front door, and config docstrings stay short."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKDOWN = sorted([ROOT / 'README.md', ROOT / 'CHANGELOG.md', *(ROOT / 'docs').rglob('*.md')])
CONFIGS = sorted((ROOT / 'configs').glob('*.py'))
README_MAX_LINES = 220
CONFIG_DOCSTRING_MAX_LINES = 15

# [text](target) and ![alt](target); the target ends at whitespace or ')', so an optional
# "title" after it is left out.
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_FENCE = re.compile(r'^\s*(```|~~~)')


def _prose(text: str) -> str:
  """`text` without fenced code blocks and inline code spans, where brackets are not links."""
  lines, in_fence = [], False
  for line in text.splitlines():
    if _FENCE.match(line.lstrip('> ')):
      in_fence = not in_fence
      continue
    if not in_fence:
      lines.append(re.sub(r'`[^`]*`', '', line))
  return '\n'.join(lines)


def relative_links(path: pathlib.Path) -> list[str]:
  """The relative link targets in markdown file `path`, without #anchors; web and mail links
  and pure anchors left out."""
  targets = []
  for target in _LINK.findall(_prose(path.read_text(encoding='utf-8'))):
    if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'):
      continue  # http(s)://, mailto: and the like; an anchor in the same file
    targets.append(target.split('#', 1)[0])
  return targets


def test_markdown_files_found():
  assert (ROOT / 'README.md') in MARKDOWN and len(MARKDOWN) > 2


@pytest.mark.parametrize('path', MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  missing = [t for t in relative_links(path) if not (path.parent / t).exists()]
  assert not missing, f'{path.relative_to(ROOT)} links to missing files: {missing}'


def test_link_parser(tmp_path):
  probe = tmp_path / 'probe.md'
  probe.write_text('[a](docs/x.md#sec) ![b](fig.png) [c](https://e.org/y) [d](#top) '
                   '`[e](not/a/link.md)`\n```\n[f](in/fence.md)\n```\n[g](z.md "title")\n'
                   '> ```\n> [h](quoted/fence.md)\n> ```\n', encoding='utf-8')
  assert relative_links(probe) == ['docs/x.md', 'fig.png', 'z.md']


def test_readme_is_short():
  lines = (ROOT / 'README.md').read_text(encoding='utf-8').count('\n')
  assert lines < README_MAX_LINES, f'README.md has {lines} lines; move detail to docs/'


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_docstring_is_short(path):
  doc = ast.get_docstring(ast.parse(path.read_text(encoding='utf-8'))) or ''
  lines = len(doc.splitlines())
  assert lines <= CONFIG_DOCSTRING_MAX_LINES, (
      f'{path.name}: module docstring of {lines} lines; at most {CONFIG_DOCSTRING_MAX_LINES} '
      '(what it is, the command, one Expected line, a link to the study page)')
