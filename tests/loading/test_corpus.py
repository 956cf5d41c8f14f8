"""The Brown corpus as text (jaxserve/loading/corpus.py): detagging on a hand-written snippet,
the file layer (categories, order), and AWQ's calibration text."""

from __future__ import annotations

import pytest

from jaxserve.errors import ConfigError
from jaxserve.loading import corpus

TAGGED = """

\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.


\tIt/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.
``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ;/. it/pps 's/bez 4-1/2%/nn (/( or/cc so/rb )/) ?/.



Merger/nn-hl proposed/vbn-hl
However/wrb ,/, they/ppss didn't/dod* say/vb so/rb !/.
"""  # noqa: E501

DETAGGED = (
    'The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary '
    'election produced "no evidence" that any irregularities took place.'
    "\n\n"
    'It was won by Ivan Allen Jr. "Only a handful", the jury said; it\'s 4-1/2% (or so)?'
    "\n\nMerger proposed\n\n"
    "However, they didn't say so!")


def test_detag_snippet(tmp_path):
    assert corpus.detag_paragraphs(TAGGED) == DETAGGED.split("\n\n")
    # Through the file layer: category filter, sorted names, paragraphs joined by blank lines.
    (tmp_path / "ca02").write_text(TAGGED)
    (tmp_path / "ca01").write_text("A/at dog/nn ./.\n")
    (tmp_path / "cj01").write_text("Not/* learned/vbn ./.\n")  # not in the press/fiction subset
    (tmp_path / "cats.txt").write_text("ca01 news\n")
    assert corpus.load_corpus_text(tmp_path) == "A dog.\n\n" + DETAGGED
    assert corpus.load_corpus_text(tmp_path, categories=("cj",)) == "Not learned."


def test_calibration_text_reads_the_given_file(tmp_path):
    (tmp_path / "cal.txt").write_text("Some calibration text.\n", encoding="utf-8")
    assert corpus.calibration_text(tmp_path / "cal.txt") == "Some calibration text.\n"
    with pytest.raises(ConfigError, match="quant_calibration .*missing.txt: cannot read"):
        corpus.calibration_text(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="bad.txt: cannot read"):
        corpus.calibration_text(tmp_path / "bad.txt")
