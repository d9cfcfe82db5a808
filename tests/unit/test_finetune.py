"""Fine-tuning pieces that need no Ray: frozen sets, sharding, the site preprocessing, fine-tuning itself."""

import json

import numpy as np
import pytest

from cytoloop.config import DataConfig, PromotionConfig
from cytoloop.data.records import CellRecord, DatasetError, load_records, select
from cytoloop.models.finetune import (
    adapted_data_config,
    finetune,
    finetune_configs,
    frozen_sets,
    shard,
    training_arrays,
)
from cytoloop.policy.drift import write_colour_reference


def fake_records(tmp_path, n, start=0):
    return [CellRecord(f"c{i}.png", tmp_path / f"c{i}.png", ["a", "b"][i % 2], "lab") for i in range(start, start + n)]


def test_frozen_sets_are_frozen_and_never_trained_on(tmp_path):
    first = fake_records(tmp_path, 40)
    sets = frozen_sets(first, tmp_path / "frozen", 0.15, 0.2)
    assert (tmp_path / "frozen" / "val.csv").is_file() and (tmp_path / "frozen" / "eval.csv").is_file()
    assert len(sets.val) and len(sets.eval) and len(sets.train) + len(sets.val) + len(sets.eval) == 40

    later = frozen_sets(first + fake_records(tmp_path, 20, start=40), tmp_path / "frozen", 0.15, 0.2)
    frozen = {str(r.path) for r in sets.val + sets.eval}
    assert {str(r.path) for r in later.val + later.eval} == frozen
    assert not frozen & {str(r.path) for r in later.train} and len(later.train) == len(sets.train) + 20


def test_no_scope_trains_on_another_scope_s_frozen_cells_nor_pools_the_judged_ones(tmp_path):
    """The label store exports every site's labels together: a global retrain trained on a site's frozen cells,
    and that site's next adaptation, from the new global champion, was gated on cells its parent had seen. The
    unlabeled pool (the null class's cells) kept frozen, audited (a site's own too) and anomaly-set cells alike."""
    from cytoloop.config import Settings
    from cytoloop.models.finetune import frozen_directory, frozen_elsewhere, not_judged_on, write_manifest

    home, cells = tmp_path / "home", fake_records(tmp_path, 60)
    north = frozen_sets(cells[:30], frozen_directory(home, "north"), 0.2, 0.2)
    held_by_north = {r.path for r in north.val + north.eval}
    assert {r.path for r in frozen_elsewhere(home, None)} == held_by_north and frozen_elsewhere(home, "north") == []
    everything = frozen_sets(cells, frozen_directory(home, None), 0.1, 0.1, also_held=frozen_elsewhere(home, None))
    assert not held_by_north & {r.path for r in everything.train}
    assert len(everything.train) == 60 - len(everything.val + everything.eval) - len(
        held_by_north - {r.path for r in everything.val + everything.eval}
    )

    audited, anomalies, audited_by_north = cells[40:42], cells[50:53], cells[44:46]
    write_manifest(audited, tmp_path / "audited.csv")
    write_manifest(anomalies, tmp_path / "anomalies.csv")
    write_manifest(audited_by_north, tmp_path / "north-audited.csv")
    settings = Settings(
        home=home,
        promotion={"audited_manifest": tmp_path / "audited.csv", "anomaly_manifest": tmp_path / "anomalies.csv"},
        sites={"north": {"audited_manifest": tmp_path / "north-audited.csv"}},
    )
    pool = not_judged_on(cells, north.val + north.eval, settings.judged_manifests())
    judged = {r.path for r in audited + anomalies + audited_by_north}
    assert {r.path for r in pool} == {r.path for r in cells} - held_by_north - judged


def test_a_copy_of_a_judged_cell_under_another_path_is_the_same_cell(tmp_path):
    """Frozen, audited and anomaly-set cells were told from training and pool cells by path: a copy under another
    folder or mount (a lab's audited manifest, a label export naming the pool's folder) was trained on, then the
    challenger judged on it. Cells are now told apart by their image's content."""
    from cytoloop.config import Settings
    from cytoloop.models.finetune import frozen_directory, not_judged_on, write_manifest
    from cytoloop.policy.promotion import gate_data

    def cells(folder: str, n: int) -> list[CellRecord]:
        (tmp_path / folder).mkdir(exist_ok=True)
        made = []
        for i in range(n):
            path = tmp_path / folder / f"c{i}.png"
            path.write_bytes(f"cell image {i}".encode())  # content is what tells cells apart here
            made.append(CellRecord(f"{folder}/c{i}.png", path, ["a", "b"][i % 2], "lab"))
        return made

    labelled, copies = cells("export", 40), cells("mount", 40)  # the same 40 images under another folder
    sets = frozen_sets(labelled, frozen_directory(tmp_path / "home", None), 0.2, 0.2)
    again = frozen_sets(copies, frozen_directory(tmp_path / "home", None), 0.2, 0.2)  # labels exported elsewhere
    frozen = {r.path.name for r in sets.val + sets.eval}
    assert not frozen & {r.path.name for r in again.train} and len(again.train) == len(sets.train)

    audited = [copies[i] for i in (0, 1, 2)]
    write_manifest(audited, tmp_path / "audited.csv")
    config = PromotionConfig(audited_manifest=tmp_path / "audited.csv")
    trained_on = [labelled[0]]  # its export copy
    data = gate_data(sets.eval, config, ["a", "b"], trained_on=trained_on)
    assert "mount/c0.png" not in {r.cell_id for r in data.eval_records}

    settings = Settings(home=tmp_path / "home", promotion={"audited_manifest": tmp_path / "audited.csv"})
    pool = not_judged_on(labelled, [], settings.judged_manifests())
    assert {r.path.name for r in pool} == {f"c{i}.png" for i in range(3, 40)}


def test_a_freeze_killed_between_its_two_files_leaves_no_half_frozen_scope(tmp_path):
    """`freeze` wrote val.csv, then eval.csv: killed between them, the scope held a val set alone, so the next
    `freeze` kept it as "already frozen" and the gate found no eval set (or the next fine-tune froze a new val
    set over the chosen one). The process is SIGKILLed while it writes the eval set."""
    import os
    import subprocess
    import sys
    import textwrap

    from cytoloop.files import umask
    from cytoloop.models.finetune import freeze, frozen_directory, frozen_elsewhere

    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from cytoloop.data.records import CellRecord
        from cytoloop.models import finetune

        write = finetune.write_manifest
        def dying(records, path):
            if Path(path).name == "eval.csv":
                os.kill(os.getpid(), signal.SIGKILL)
            return write(records, path)
        finetune.write_manifest = dying
        cells = [CellRecord(f"c{{i}}.png", Path({str(tmp_path)!r}) / f"c{{i}}.png", "a", "lab") for i in range(4)]
        finetune.freeze(finetune.frozen_directory(Path({str(home)!r}), "north"), cells[:2], cells[2:])
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    died = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert died.returncode == -9, died.stderr
    directory = frozen_directory(home, "north")
    assert not (directory / "val.csv").exists()  # nothing half-frozen in the scope
    assert frozen_elsewhere(home, None) == []  # the killed writer's staging folder is no scope
    cells = fake_records(tmp_path, 6)
    assert freeze(directory, cells[:3], cells[3:])  # frozen now, whole
    assert len(frozen_elsewhere(home, None)) == 6
    assert list(directory.parent.glob(".north.*.tmp")) == []  # the killed writer's staging folder removed
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask()  # as mkdir makes it, not owner-only


def test_two_first_fine_tunes_of_a_scope_at_once_freeze_one_split(tmp_path, monkeypatch):
    """Two first fine-tunes of one scope (the ML backend's retrain and a scheduled one, other label exports) each
    found no frozen sets and wrote its own split, file by file: a caller then held, and trained beside, a val or
    eval set that was not the one left on disk for every later gate. The writes are slowed so the two overlap."""
    import threading
    import time

    from cytoloop.models import finetune

    write = finetune.write_manifest

    def slow(records, path):
        time.sleep(0.3)
        return write(records, path)

    monkeypatch.setattr(finetune, "write_manifest", slow)
    directory, answers = tmp_path / "frozen", {}

    def fine_tune(name, records, seed):
        answers[name] = frozen_sets(records, directory, 0.2, 0.2, seed=seed)

    threads = [
        threading.Thread(target=fine_tune, args=("a", fake_records(tmp_path, 40), 0)),
        threading.Thread(target=fine_tune, args=("b", fake_records(tmp_path, 60), 1)),
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    on_disk = {part: {str(r.path) for r in load_records(directory / f"{part}.csv")} for part in ("val", "eval")}
    for sets in answers.values():
        assert {str(r.path) for r in sets.val} == on_disk["val"] and {str(r.path) for r in sets.eval} == on_disk["eval"]
        assert not {str(r.path) for r in sets.train} & (on_disk["val"] | on_disk["eval"])


def test_frozen_sets_need_enough_cells(tmp_path):
    with pytest.raises(DatasetError, match="too few labelled cells"):
        frozen_sets(fake_records(tmp_path, 2), tmp_path / "frozen", 0.15, 0.2)


def test_shard_deals_each_class_and_shares_rare_ones():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    parts = [shard(labels, rank, 2) for rank in range(2)]
    assert sorted(np.concatenate([p[labels[p] != 2] for p in parts]).tolist()) == list(range(9))
    for part in parts:
        assert set(labels[part]) == {0, 1, 2}  # the single class-2 cell goes to both workers


def test_site_normalisation_targets_the_training_colours(tmp_path):
    class Model:
        data_config = DataConfig(stain_normalization="none")

    write_colour_reference(tmp_path, np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]))
    config = adapted_data_config(Model(), tmp_path, stain_normalize=True)
    assert config.stain_normalization == "reinhard"
    assert config.stain_reference == pytest.approx((0.2, 0.3, 0.4, 0.5, 0.6, 0.7))
    assert adapted_data_config(Model(), tmp_path, stain_normalize=False) == Model.data_config
    Model.data_config = DataConfig(stain_normalization="reinhard")
    assert adapted_data_config(Model(), tmp_path, stain_normalize=True) == Model.data_config


def test_finetune_continues_from_the_model(cells_dir, tiny_settings):
    from cytoloop.workflows import build_model

    records = select(load_records(cells_dir), ["jtsc"], ["neutrophil", "lymphocyte"])[:12]
    model = build_model("baseline", ["neutrophil", "lymphocyte"], tiny_settings)
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    images, labels, kept = training_arrays(model, records)
    assert len(images) == len(labels) == len(kept) == 12
    train_config, augment_config = finetune_configs(
        tiny_settings.model_copy(update={"adapt": tiny_settings.adapt.model_copy(update={"steps": 3})}), adapt=True
    )
    assert augment_config.hed_sigma == tiny_settings.adapt.hed_sigma and train_config.steps == 3
    result = finetune(model, images, labels, train_config, augment_config)
    assert result.history and any(not np.allclose(before[k], v) for k, v in model.network.state_dict().items())

    with pytest.raises(DatasetError, match="not one of the model's classes"):
        training_arrays(model, select(load_records(cells_dir), ["jtsc"], ["monocyte"])[:2])


def test_a_fine_tuned_diffusion_model_is_served_with_its_own_tuned_rule(cells_dir, tiny_settings, tmp_path):
    """recalibrate(tune=True): the fine-tune ends by tuning its scoring on the frozen validation cells; the rule
    saved with the model is the one a loaded (served) model scores with, and its tuning report is kept."""
    from cytoloop.models.finetune import recalibrate
    from cytoloop.models.loading import load_model
    from cytoloop.workflows import build_model

    classes = ["neutrophil", "lymphocyte"]
    records = select(load_records(cells_dir), ["jtsc"], classes)
    model = build_model("diffusion", classes, tiny_settings)
    parent_rule = model.scoring_config.model_copy(update={"min_trials": 8, "elimination_p": 1e-6})
    model.scoring_config = parent_rule  # a parent's rule that a tuning would not keep: it wastes trials
    images, labels, _ = training_arrays(model, records[:8])
    train_config, augment_config = finetune_configs(tiny_settings, adapt=False)
    finetune(model, images, labels, train_config, augment_config)
    figures = recalibrate(model, records[8:24], tune=True, tuning_out=tmp_path / "tuning.json")

    tuning = json.loads((tmp_path / "tuning.json").read_text())
    chosen = tuning["chosen"]
    assert chosen is not None and figures["tuned_evals_mean"] == chosen["evals_mean"]
    assert (model.scoring_config.min_trials, model.scoring_config.elimination_p) == (
        chosen["min_trials"],
        chosen["elimination_p"],
    )
    assert model.scoring_config != parent_rule
    assert tuning["n_cells"] == 16 and tuning["n_temperature_cells"] == 16
    model.save(tmp_path / "model")
    served = load_model(tmp_path / "model")
    assert served.scoring_config == model.scoring_config and served.temperature == model.temperature

    # a cap on the exhaustive passes (finetune.tuning_cells): fewer cells tuned, all of them for the temperature,
    # and the model keeps its own calibration_cells
    own = model.scoring_config.calibration_cells
    recalibrate(model, records[8:24], tune=True, tuning_out=tmp_path / "capped.json", tuning_cells=6)
    capped = json.loads((tmp_path / "capped.json").read_text())
    assert capped["n_cells"] == 6 and capped["n_temperature_cells"] == 16
    assert model.scoring_config.calibration_cells == own


def test_a_site_model_is_recalibrated_as_its_site_is_served(cells_dir, tiny_settings):
    """recalibrate(allowed=...): the temperature fits the CNN's logits with the classes the site does not report
    out of play, and the figures before and after are the site's."""
    from cytoloop.models.finetune import recalibrate
    from cytoloop.scoring.calibration import fit_temperature
    from cytoloop.workflows import build_model, label_indices

    classes = ["neutrophil", "lymphocyte", "monocyte"]
    records = select(load_records(cells_dir), ["jtsc"], ["neutrophil", "lymphocyte"])[:16]
    model = build_model("baseline", classes, tiny_settings)
    images, _, _ = training_arrays(model, records)
    logits = model.logits(images)
    # the site lacks the class the untrained CNN favours, and its cells are labelled as the CNN decides among the
    # other two: fitted on all classes the temperature would have to explain the favoured one away
    favoured = int(logits.mean(axis=0).argmax())
    allowed = np.arange(3) != favoured
    site_classes = [c for c, keep in zip(classes, allowed) if keep]
    decided = np.where(allowed, logits, -np.inf).argmax(axis=1)
    records = [CellRecord(r.cell_id, r.path, classes[k], r.domain) for r, k in zip(records, decided)]
    labels = label_indices(records, classes)
    figures = recalibrate(model, records, allowed=site_classes)
    masked = np.where(allowed, logits, -np.inf)
    assert model.temperature == pytest.approx(fit_temperature(masked, labels), rel=1e-4)
    assert model.temperature != pytest.approx(fit_temperature(logits, labels), rel=1e-3)
    assert figures["nll_after"] <= figures["nll_before"] + 1e-9


def test_a_fine_tune_trains_on_none_of_its_parent_s_held_out_cells_and_carries_its_split(tmp_path):
    """A fine-tuned version carried no split: `evaluate` on it excluded nothing (it starts from weights that
    trained on the parent's cells) and `--part test` failed; and the fine-tune could train on the parent's test
    cells. It trains on neither the parent's validation nor its test cells now, and carries the parent's split
    with its own training and calibration cells added."""
    import json

    from cytoloop.data.records import CellRecord
    from cytoloop.workflows import SPLIT_FILE, carry_split, held_out, outside_held_out

    def cell(name: str) -> CellRecord:
        return CellRecord(f"pbc/{name}.jpg", tmp_path / "data" / "pbc" / f"{name}.jpg", "a", "pbc")

    parent, child = tmp_path / "parent", tmp_path / "child"
    parent.mkdir()
    child.mkdir()
    parts = {"train": ["pbc/t1.jpg"], "val": ["pbc/v1.jpg"], "test": ["pbc/x1.jpg", "pbc/x2.jpg"]}
    (parent / SPLIT_FILE).write_text(json.dumps({"meta": {"seed": 0}, "parts": parts}))
    labelled = [cell("t1"), cell("v1"), cell("x1"), cell("new1"), cell("new2")]
    kept, left_out = outside_held_out(labelled, parent)
    assert [r.cell_id for r in kept] == ["pbc/t1.jpg", "pbc/new1.jpg", "pbc/new2.jpg"] and left_out == 2
    carry_split(parent, child, kept[1:2], [cell("new2"), cell("x1")])  # x1: a frozen calibration cell now
    carried = json.loads((child / SPLIT_FILE).read_text())["parts"]
    assert carried["val"] == ["pbc/new2.jpg", "pbc/v1.jpg", "pbc/x1.jpg"] and carried["test"] == ["pbc/x2.jpg"]
    carry_split(parent, child, kept[1:2], [cell("new2")])
    evaluable, excluded = held_out([*labelled, cell("x2")], child)
    assert sorted(r.cell_id for r in evaluable) == ["pbc/x1.jpg", "pbc/x2.jpg"] and excluded == 4
    assert [r.cell_id for r in held_out([*labelled, cell("x2")], child, part="test")[0]] == ["pbc/x1.jpg", "pbc/x2.jpg"]
    assert outside_held_out(labelled, tmp_path / "no-split") == (labelled, 0)
    carry_split(tmp_path / "no-split", child / "none", [], [])  # a parent without a split: nothing written
    assert not (child / "none").exists()


def test_the_first_freeze_keeps_the_parent_s_training_and_calibration_cells_out_of_the_frozen_sets(tmp_path):
    """A site's first freeze drew its gate and calibration sets from all its labels: those its parent trained on (a
    site whose cells the base model learnt from) went into them, and the gate compared every challenger with a
    champion judged on cells it had learnt. The parent's training and validation cells are never frozen now."""
    import json

    from cytoloop.workflows import SPLIT_FILE, seen_by

    cells = fake_records(tmp_path, 60)
    parent = tmp_path / "parent"
    parent.mkdir()
    learnt, calibrated, tested = cells[:20], cells[20:26], cells[26:30]
    parts = {
        name: [r.cell_id for r in part] for name, part in (("train", learnt), ("val", calibrated), ("test", tested))
    }
    (parent / SPLIT_FILE).write_text(json.dumps({"meta": {"seed": 0}, "parts": parts}))
    seen = seen_by(cells, parent)
    assert seen == learnt + calibrated and seen_by(cells, tmp_path / "no-split") == []

    sets = frozen_sets(cells, tmp_path / "frozen", 0.2, 0.2, not_frozen=seen)
    frozen = {r.cell_id for r in sets.val + sets.eval}
    assert frozen and not frozen & {r.cell_id for r in seen}
    assert {r.cell_id for r in learnt} <= {r.cell_id for r in sets.train}  # still trained on
    with pytest.raises(DatasetError, match=r"too few labelled cells \(2\) \(26 others are the parent's"):
        frozen_sets(cells[:28], tmp_path / "other", 0.2, 0.2, not_frozen=seen)
