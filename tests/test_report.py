"""The HTML calibration report: its tables, its embedded figures, its metrics JSON."""

import base64
import json
from html.parser import HTMLParser

import pytest
import torch

from sbida.data import WindowDataset
from sbida.diagnostics import EvaluationResult
from sbida.posterior import GaussianPosterior
from sbida.report import metrics_table, render, write


class Page(HTMLParser):
    """Collects the tables (rows of cell texts, by id) and the images of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links = {}, [], []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(a)
        elif tag in ("link", "script"):
            self.links.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    p = Page()
    p.feed(text)
    return p


def gaussian_dataset(n_traj=12, steps=14, shape=(6,), seed=0):
    """States x ~ N(0, I), observed directly with noise 0.5 at every time: the posterior of the last state is
    N(x_obs / 1.25, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n_traj, steps, *shape, generator=g)
    y = states + 0.5 * torch.randn(states.shape, generator=g)
    mask = torch.ones_like(y, dtype=torch.bool)
    return WindowDataset(states, y, mask, torch.arange(steps, dtype=torch.float64), window=1)


def exact(scale=1.0):
    def fn(y, m, t):
        mean = y[:, -1] / 1.25
        return GaussianPosterior(mean, std=torch.full_like(mean, 0.2 ** 0.5 * scale))
    return fn


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    data = gaussian_dataset()
    path = tmp_path_factory.mktemp("report") / "report.html"
    write({"exact": exact(), "overconfident": exact(0.3)}, data, path, n_samples=100, max_windows=120,
          reference=exact(), c2st_windows=3, training_time={"exact": 1.5}, progress=False, n_examples=2)
    return path, parse(path.read_text())


def test_table_rows_match_the_metrics_json(report):
    path, page = report
    rows = page.tables["metrics"]
    header = rows[0]
    assert header[0] == "method" and "RMSE" in header and "C2ST AUC" in header and "TARP ATC" in header
    body = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert set(body) == {"exact", "overconfident"}
    table = json.loads(path.with_suffix(".json").read_text())["table"]
    for name in body:
        assert float(body[name]["RMSE"]) == pytest.approx(table[name]["rmse"], rel=1e-3)
        assert float(body[name]["coverage ECE"]) == pytest.approx(table[name]["coverage_ece"], abs=1e-3)
    assert body["exact"]["training time (s)"] == "1.5" and body["overconfident"]["training time (s)"] == "-"
    assert float(body["exact"]["time per window (ms)"]) > 0


def test_table_tells_calibrated_from_overconfident(report):
    path, page = report
    header, *rows = page.tables["metrics"]
    body = {r[0]: dict(zip(header, r)) for r in rows}
    # the exact posterior is calibrated; the one with 0.3 times its spread covers far too little
    assert float(body["exact"]["coverage ECE"]) < 0.1 < float(body["overconfident"]["coverage ECE"])
    assert float(body["overconfident"]["spread/skill"]) < 0.5 < float(body["exact"]["spread/skill"])
    # by scale too: spread/skill near 1 at every wavenumber for the exact posterior, 0.3 for the other one
    results = json.loads(path.with_suffix(".json").read_text())["results"]
    assert max(abs(r - 1) for r in results["exact"]["spectrum"]) < 0.25
    assert max(abs(r - 0.3) for r in results["overconfident"]["spectrum"]) < 0.08
    # a C2ST of the exact posterior against itself is near chance, the overconfident one is told apart
    assert float(body["exact"]["C2ST AUC"]) < 0.65 < float(body["overconfident"]["C2ST AUC"])


def test_figures_are_embedded_pngs(report):
    _, page = report
    # coverage, SBC panels, TARP, spread/skill by scale, and 2 example windows x 2 methods
    assert len(page.images) == 4 + 4
    assert [img["alt"] for img in page.images].count("spread/skill spectra") == 1
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert img.get("alt")
    assert page.links == []  # no stylesheet or script from elsewhere


def test_results_without_a_reference_have_no_c2st_column(tmp_path):
    data = gaussian_dataset()
    from sbida.diagnostics import evaluate

    r = evaluate(exact(), data, n_samples=50, progress=False, name="exact")
    again = EvaluationResult.from_json(r.to_json())
    path = write({"exact": again}, data, tmp_path / "r.html", progress=False)
    page = parse(path.read_text())
    assert "C2ST AUC" not in page.tables["metrics"][0]
    assert len(page.images) == 4  # no examples without samples
    assert again.spectrum == r.spectrum and len(r.spectrum) == 4  # wavenumbers 0-3 of the 6-cell states


def test_two_dimensional_examples_are_images(tmp_path):
    data = gaussian_dataset(n_traj=4, steps=6, shape=(2, 8, 8))
    path = write({"exact": exact()}, data, tmp_path / "r.html", n_samples=20, progress=False, n_examples=1)
    page = parse(path.read_text())
    assert len(page.images) == 4 + 1
    stored = json.loads(path.with_suffix(".json").read_text())["results"]["exact"]
    row = metrics_table({"a": EvaluationResult.from_dict(stored)})["a"]
    assert row["training_seconds"] is None and row["rmse"] == pytest.approx(stored["rmse"])


def test_bad_inputs_are_value_errors(tmp_path):
    data = gaussian_dataset()
    with pytest.raises(ValueError, match="non-empty mapping"):
        write({}, data, tmp_path / "r.html")
    with pytest.raises(ValueError, match="WindowDataset"):
        write({"exact": exact()}, [1, 2], tmp_path / "r.html")
    with pytest.raises(ValueError, match="EvaluationResult"):
        render({"x": 3})
    with pytest.raises(ValueError, match=r"posterior\(y, mask, t\)"):
        write({"x": 3}, data, tmp_path / "r.html", progress=False)
