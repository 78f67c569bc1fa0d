"""Caption editor: every operation on a fixed caption set, dry run, scope, undo byte for byte, stats, widget."""

from __future__ import annotations

import pytest
from PIL import Image

from nbkit.data.images import DatasetError
from nbkit.tag import tags as ops
from nbkit.tag.backup import BACKUP_DIRNAME, list_backups, undo
from nbkit.tag.editor import Edit, edit_captions
from nbkit.tag.files import CaptionError, caption_files, parse_caption
from nbkit.tag.stats import dataset_tag_counts, frequency_table, plot_top_tags

# image -> caption bytes (None: no caption file). CRLF, a BOM, a missing final newline and a
# two-line caption are there on purpose: untouched files must keep their bytes, edited ones their format.
CAPTIONS = {
    "10_sks/a.png": b"1girl, solo, long_hair, simple_background\n",
    "10_sks/b.png": b"solo, 1girl, white_background, smile, smile\n",
    "10_sks/c.png": b"cat, simple_background\r\n",
    "5_reg/d.png": b"1boy, outdoors, sky",
    "5_reg/e.png": None,
    "5_reg/f.jpg": "\ufeff1girl, hat, sks\n".encode(),
    "5_reg/g.webp": b"1girl, hat\n1girl, cap\n",
}


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "dataset"
    for name, caption in CAPTIONS.items():
        image = root / name
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(image)
        if caption is not None:
            image.with_suffix(".txt").write_bytes(caption)
    return root


def snapshot(root):
    """Every file's bytes except the backups: what undo must give back."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and BACKUP_DIRNAME not in p.parts}


def text(root, name):
    return (root / name).with_suffix(".txt").read_bytes().decode("utf-8")


# ---------------------------------------------------------------- pure tag functions
def test_pure_tag_functions():
    tags = ["solo", "1girl", "smile", "solo"]
    assert ops.split_tags(" a, b ,,c ") == ["a", "b", "c"]
    assert ops.dedupe(tags) == ["solo", "1girl", "smile"]
    assert ops.add_tags(tags[:3], ["sks", "smile"]) == ["sks", "smile", "solo", "1girl"]
    assert ops.add_tags(tags[:3], ["sks"], "back") == ["solo", "1girl", "smile", "sks"]
    assert ops.remove_tags(["long_hair", "short_hair", "hat"], globs=["*_hair"]) == ["hat"]
    assert ops.remove_tags(["long_hair", "hair", "hat"], regexes=["h.*"]) == ["long_hair"]  # full match
    assert ops.replace_tags(["a", "x", "b", "y"], ["x", "y"], ["z"]) == ["a", "z", "b"]
    assert ops.replace_tags(["a", "x"], ["x", "y"], ["z"], mode="all") == ["a", "x"]
    assert ops.replace_tags(["x", "a", "y"], ["x", "y"], ["a", "z"], mode="all") == ["z", "a"]  # no duplicate a
    assert ops.sort_tags(["c", "a", "b"], keep=1) == ["c", "a", "b"]
    assert ops.sort_tags(["c", "b", "a"]) == ["a", "b", "c"]
    assert ops.merge_tags(["a", "b"], ["b", "c"], "append") == ["a", "b", "c"]
    assert ops.merge_tags(["a", "b"], ["b", "c"], "prepend") == ["b", "c", "a"]
    assert ops.merge_tags(["a"], ["c"], "skip") is None
    assert ops.escape_brackets("smile_(x)") == "smile_\\(x\\)" and ops.unescape_brackets("\\(x\\)") == "(x)"


def test_parse_and_render_keep_format():
    doc = parse_caption("\ufeffa, b\r\n\r\nc\r\n")
    assert doc.lines == [["a", "b"], None, ["c"]] and doc.bom and doc.newline == "\r\n"
    assert doc.render() == "\ufeffa, b\r\n\r\nc\r\n"
    assert parse_caption("").lines == [[]]


# ---------------------------------------------------------------- edits on the fixed set
def test_activate_puts_tag_first_and_reports_keep_tokens(data):
    report = edit_captions(data, [Edit.activate("sks")])
    assert text(data, "10_sks/a.png") == "sks, 1girl, solo, long_hair, simple_background\n"
    assert text(data, "5_reg/f.jpg") == "\ufeffsks, 1girl, hat\n"  # moved, not repeated; BOM kept
    assert text(data, "10_sks/c.png") == "sks, cat, simple_background\r\n"  # CRLF kept
    assert text(data, "5_reg/d.png") == "sks, 1boy, outdoors, sky"  # no final newline added
    assert text(data, "5_reg/g.webp") == "sks, 1girl, hat\nsks, 1girl, cap\n"  # every line of a multi-line caption
    assert not (data / "5_reg/e.txt").exists()  # images without captions are left alone
    assert (report.files, len(report.changed), report.keep_tokens) == (6, 6, 1)
    assert "keep_tokens = 1" in report.summary()


def test_remove_by_name_glob_and_regex(data):
    report = edit_captions(data, [Edit.remove("solo"), Edit.remove(globs=["*_background"]), Edit.remove(regexes=["c.t"])])
    assert report.touched == [("remove solo", 2), ("remove *_background", 3), ("remove /c.t/", 1)]
    assert text(data, "10_sks/a.png") == "1girl, long_hair\n"
    assert text(data, "10_sks/b.png") == "1girl, smile, smile\n"
    assert text(data, "10_sks/c.png") == "\r\n"
    assert text(data, "5_reg/g.webp") == "1girl, hat\n1girl, cap\n"  # "cap" is not a full match of c.t


def test_replace_with_and_or_conditions(data):
    edit_captions(data, [Edit.replace("hat, cap", "headwear", mode="any")])
    assert text(data, "5_reg/g.webp") == "1girl, headwear\n1girl, headwear\n"
    assert text(data, "5_reg/f.jpg") == "\ufeff1girl, headwear, sks\n"
    before = snapshot(data)
    report = edit_captions(data, [Edit.replace("1girl, solo", "1woman", mode="all")])
    assert report.touched == [("replace (all) 1girl, solo -> 1woman", 2)]
    assert text(data, "10_sks/a.png") == "1woman, long_hair, simple_background\n"
    assert text(data, "10_sks/b.png") == "1woman, white_background, smile, smile\n"
    assert snapshot(data)["5_reg/f.txt"] == before["5_reg/f.txt"]
    report = edit_captions(data, [Edit.replace("smile", "grin").only_if(all_of="1woman, white_background")])
    assert report.touched[0][1] == 1 and text(data, "10_sks/b.png") == "1woman, white_background, grin\n"
    report = edit_captions(data, [Edit.suffix("indoors").only_if(any_of="cat, 1boy")])
    assert report.touched[0][1] == 2
    assert text(data, "10_sks/c.png") == "cat, simple_background, indoors\r\n"
    assert text(data, "5_reg/d.png") == "1boy, outdoors, sky, indoors"


def test_dedupe_sort_prefix_suffix_substitute(data):
    report = edit_captions(data, [Edit.dedupe()])
    assert report.touched == [("dedupe", 1)] and text(data, "10_sks/b.png") == "solo, 1girl, white_background, smile\n"
    edit_captions(data, [Edit.sort()])
    assert text(data, "10_sks/a.png") == "1girl, long_hair, simple_background, solo\n"
    edit_captions(data, [Edit.prefix("masterpiece"), Edit.sort("frequency", keep=1)])
    # counts: 1girl 4 files, simple_background 2, solo 2 -> 1girl, simple_background, solo, long_hair
    assert text(data, "10_sks/a.png") == "masterpiece, 1girl, simple_background, solo, long_hair\n"
    edit_captions(data, [Edit.substitute("_", " "), Edit.suffix("best quality")])
    assert text(data, "10_sks/a.png") == "masterpiece, 1girl, simple background, solo, long hair, best quality\n"


def test_subfolder_scope_and_no_recursion(data):
    report = edit_captions(data, [Edit.activate("reg")], subfolders=["5_reg"])
    assert sorted(p.name for p in report.changed) == ["d.txt", "f.txt", "g.txt"]
    assert text(data, "10_sks/a.png").startswith("1girl")
    assert edit_captions(data, [Edit.dedupe()], recursive=False).files == 0
    with pytest.raises(DatasetError, match="no such subfolder.*10_sks, 5_reg"):
        edit_captions(data, [Edit.dedupe()], subfolders=["7_missing"])


def test_dry_run_counts_each_edit_and_writes_nothing(data):
    before = snapshot(data)
    report = edit_captions(data, [Edit.activate("sks"), Edit.remove("smile"), Edit.dedupe()], dry_run=True)
    assert report.touched == [("activate sks", 6), ("remove smile", 1), ("dedupe", 0)]
    assert len(report.changed) == 6 and report.backup is None
    assert snapshot(data) == before and not (data / BACKUP_DIRNAME).exists()
    assert "would change" in report.summary() and "- 1girl, solo" in report.summary()


def test_undo_restores_bytes_step_by_step_and_all(data):
    original = snapshot(data)
    first = edit_captions(data, [Edit.activate("sks")])
    after_first = snapshot(data)
    edit_captions(data, [Edit.remove(globs=["*"])])
    assert first.backup is not None and len(list_backups(data)) == 2
    undo(data)
    assert snapshot(data) == after_first
    result = undo(data)
    assert snapshot(data) == original and len(result.restored) == 6
    assert not (data / BACKUP_DIRNAME).exists()
    with pytest.raises(FileNotFoundError, match="nothing to undo"):
        undo(data)
    edit_captions(data, [Edit.activate("x")])
    edit_captions(data, [Edit.dedupe()])
    edit_captions(data, [Edit.sort()])
    undo(data, everything=True)
    assert snapshot(data) == original


def test_backups_in_another_folder(data, tmp_path):
    store = tmp_path / "project" / "state" / "caption_backups"
    original = snapshot(data)
    report = edit_captions(data, [Edit.activate("sks")], backup_dir=store)
    assert report.backup.parent == store and not (data / BACKUP_DIRNAME).exists()
    assert list_backups(tmp_path / "other", backup_dir=store) == []  # backups are matched to their root
    undo(data, backup_dir=store)
    assert snapshot(data) == original


def test_non_utf8_caption_is_a_clear_error_and_nothing_changes(data):
    (data / "10_sks/c.txt").write_bytes("café, chat".encode("cp1252"))
    before = snapshot(data)
    with pytest.raises(CaptionError, match=r"c\.txt: not UTF-8.*re-save it as UTF-8"):
        edit_captions(data, [Edit.activate("sks")])
    assert snapshot(data) == before


def test_bad_arguments_fail_before_reading():
    with pytest.raises(ValueError, match="mode"):
        Edit.replace("a", "b", mode="both")
    with pytest.raises(ValueError, match="sort by"):
        Edit.sort("size")
    with pytest.raises(ValueError, match="give tag names"):
        Edit.remove()


# ---------------------------------------------------------------- statistics
def test_stats_table_and_chart(data, tmp_path):
    counts, files = dataset_tag_counts(data)
    assert files == 6 and counts["1girl"] == 4 and counts["smile"] == 1  # per caption, not per occurrence
    table = frequency_table(counts, files, top=2)
    assert table.splitlines()[1].split() == ["1girl", "4", "66.7%"] and len(table.splitlines()) == 3
    fig = plot_top_tags(counts, top=5, path=tmp_path / "chart" / "tags.png")
    assert (tmp_path / "chart" / "tags.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][-1] == "1girl"


# ---------------------------------------------------------------- CLI
def test_cli_edit_dry_run_undo_and_errors(data, capsys):
    from nbkit.cli import main

    original = snapshot(data)
    assert main(["captions", "activate", str(data), "sks", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 caption files would change" in out and "keep_tokens = 1" in out and snapshot(data) == original
    assert main(["captions", "replace", str(data), "smile", "", "--if-any", "solo"]) == 0
    assert text(data, "10_sks/b.png") == "solo, 1girl, white_background\n"
    assert main(["captions", "remove", str(data), "--glob", "*hair", "--subfolder", "10_sks"]) == 0
    assert main(["captions", "stats", str(data), "--top", "3"]) == 0
    assert "1girl" in capsys.readouterr().out
    assert main(["captions", "undo", str(data), "--list"]) == 0
    assert capsys.readouterr().out.count("edit,") == 2
    assert main(["captions", "undo", str(data), "--all"]) == 0 and snapshot(data) == original
    assert main(["captions", "remove", str(data), "--regex", "("]) == 2
    assert "error" in capsys.readouterr().err
    (data / "5_reg/d.txt").write_bytes(b"\xe9t\xe9")
    assert main(["captions", "dedupe", str(data)]) == 2
    assert "d.txt: not UTF-8" in capsys.readouterr().err


# ---------------------------------------------------------------- widget
def test_widget_edit_save_navigate_and_undo(data):
    from nbkit.tag.widgets import CaptionEditor

    original = snapshot(data)
    editor = CaptionEditor(data, thumbnail=64)
    assert editor.images[0].name == "a.png" and editor.text.value == "1girl, solo, long_hair, simple_background"
    assert editor.image.value[:4] == b"\x89PNG"
    assert editor.save() is False  # unchanged
    editor.text.value = "sks, 1girl"
    editor.buttons["save"].click()
    assert text(data, "10_sks/a.png") == "sks, 1girl\n"
    editor.buttons["next ▶"].click()
    assert editor.index == 1 and editor.slider.value == 1 and editor.text.value.startswith("solo")
    editor.show(4)  # e.png: no caption yet; saving creates it
    assert editor.text.value == ""
    editor.text.value = "1girl"
    assert editor.save() and text(data, "5_reg/e.png") == "1girl\n"
    editor.buttons["◀ previous"].click()
    assert editor.index == 3
    assert len(list_backups(data)) == 1  # one backup per widget session
    undo(data)
    assert snapshot(data) == original  # e.txt, created by the widget, is gone again


def test_widget_shows_non_utf8_error_without_crashing(data):
    from nbkit.tag.widgets import CaptionEditor

    (data / "10_sks/a.txt").write_bytes(b"\xff\xfe")
    editor = CaptionEditor(data)
    assert editor.text.disabled and "not UTF-8" in editor.status.value
    assert editor.save() is False
    editor.next()
    assert not editor.text.disabled


def test_caption_files_ignore_backup_folder(data):
    edit_captions(data, [Edit.activate("sks")])
    assert all(BACKUP_DIRNAME not in p.parts for p in caption_files(data))
    assert len(caption_files(data)) == 6
