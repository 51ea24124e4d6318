"The slice set, the cache and split, the real-data loaders (files shipped by PyPI packages), the Duke layout and bad input."
import json, re, shutil, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

from mri_protodiff.core import RunDir, get_profile
from mri_protodiff.phantom import LABELS, LABEL_INDEX, array_hash
from mri_protodiff.data import SliceSet, phantom_sliceset, load_sliceset, load_split, make_split, CacheWriter, read_cache
from mri_protodiff.readers import read_any, read_volume, read_dicom_series, index_folder, write_duke_example
from mri_protodiff.pipeline import run_data

L = LABEL_INDEX

def _site(pkg):
    import importlib
    return Path(importlib.import_module(pkg).__file__).parent

def _run(tmp_path, name="run", **over):
    return RunDir(tmp_path/name, get_profile("smoke", **over))

def _build(tmp_path, source, name="run", **opts):
    rd = _run(tmp_path, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_data(rd, source, **opts)
    return rd, [str(c.message) for c in caught]

class _Result:
    def __init__(self, returncode, stdout, stderr): self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

def _cli(*args):
    "Run `mri-protodiff ARGS` in this process (the console script calls the same `main`), capturing its output."
    import contextlib, io
    import mri_protodiff.cli as cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = cli.main([str(a) for a in args])
        except SystemExit as e: rc = e.code
    return _Result(rc, out.getvalue(), err.getvalue())

def _failed_cleanly(rd):
    "The stage is not marked done and left no cache (and no temporary folder) behind."
    assert rd.stage("data").get("status") == "failed"
    assert not (rd.root/"data").exists()
    assert not [p for p in rd.root.iterdir() if p.name.startswith(".data")]

def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(arr).save(path)

def _img(seed, shape=(40, 40), dtype=np.uint8):
    rng = np.random.default_rng(seed)
    a = np.zeros(shape); a[shape[0] // 4: 3 * shape[0] // 4, shape[1] // 4: 3 * shape[1] // 4] = 1
    a = a * 0.8 + 0.2 * rng.random(shape)
    return (a * (255 if dtype == np.uint8 else 65535)).astype(dtype)

# ---------------------------------------------------------------- slice set, cache, split

def test_sliceset_contract():
    ss = phantom_sliceset(4, 3, 32, seed=0)
    assert ss.images.shape == (12, 1, 32, 32) and ss.images.dtype == np.float32
    assert ss.masks.shape == (12, 32, 32) and ss.masks.dtype == np.uint8
    assert -1 <= ss.images.min() < 0 < ss.images.max() <= 1
    for k in ("density", "lesion", "slice_index"): assert getattr(ss, k).dtype == np.int64
    assert ss.n_labels == len(LABELS) and ss.label_names == LABELS and len(ss) == 12
    sub = ss.subset(np.array([1, 5]))
    assert len(sub) == 2 and sub.subject.tolist() == [ss.subject[1], ss.subject[5]]
    with pytest.raises(ValueError, match="masks"):
        SliceSet(ss.images, ss.masks[:3], ss.density, ss.lesion, ss.subject, ss.slice_index, ss.source)

def test_cli_phantom_quick_profile_cache_split_and_fast_reload(tmp_path):
    out = tmp_path/"runs"/"x"
    r = _cli("data", "--data", "phantom", "--profile", "quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    prof = get_profile("quick")
    for f in ("images.npy", "masks.npy", "split.json", "meta.json"): assert (out/"data"/f).exists()
    t0 = time.perf_counter(); ss = load_sliceset(out); sp = load_split(out); dt = time.perf_counter() - t0
    assert dt < 1.0, dt
    assert isinstance(ss.images, np.memmap) and len(ss) == prof.data.n_subjects * prof.data.slices_per_subject
    assert ss.size == (prof.data.image_size, prof.data.image_size)
    subj = {k: set(ss.subject[v]) for k, v in sp.items()}
    assert not subj["train"] & subj["test"] and not subj["train"] & subj["val"] and not subj["val"] & subj["test"]
    assert sorted(np.concatenate(list(sp.values()))) == list(range(len(ss)))
    assert set(ss.density[sp["test"]]) == {0, 1, 2, 3}            # every density class reaches the test set
    te = load_sliceset(out, "test")
    assert isinstance(te.images, np.memmap) and not te.images.flags.owndata   # a view of the memory map, not a copy
    assert np.array_equal(te.images, ss.images[sp["test"]])
    js = json.loads((out/"data"/"split.json").read_text())
    assert js["subjects"]["test"] == sorted(set(te.subject))
    # same profile and seed -> the same bytes, and a second call is skipped
    rd = RunDir(out)
    assert run_data(rd) == "skipped"

def test_stage_deterministic_across_runs(tmp_path):
    a, _ = _build(tmp_path, "phantom", "a"); b, _ = _build(tmp_path, "phantom", "b")
    sa, sb = load_sliceset(a), load_sliceset(b)
    assert array_hash(sa.images, sa.masks) == array_hash(sb.images, sb.masks)
    assert load_split(a)["test"].tolist() == load_split(b)["test"].tolist()
    assert run_data(a, force=True) == "done"

def test_min_breast_fraction_drops_slices(tmp_path):
    rd, _ = _build(tmp_path, "phantom", min_breast_fraction=0.2)
    ss = load_sliceset(rd)
    meta = json.loads((rd.root/"data"/"meta.json").read_text())
    assert meta["dropped_slices"] > 0 and len(ss) + meta["dropped_slices"] == 12 * 6

def test_split_is_by_subject_and_stratified():
    subs = [f"s{i:02d}" for i in range(40)]
    sp = make_split(subs, [i % 4 for i in range(40)], 0.2, 0.2, seed=3)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [24, 8, 8]
    assert sorted({int(s[1:]) % 4 for s in sp["test"]}) == [0, 1, 2, 3]
    assert make_split(subs, None, 0.2, 0.2, seed=4) != make_split(subs, None, 0.2, 0.2, seed=3)

def test_cache_writer_streams_and_trims(tmp_path):
    w = CacheWriter(tmp_path/"c", n_max=1000, size=(8, 8))
    for i in range(3):
        w.append(dict(images=np.full((2, 1, 8, 8), i / 3, np.float32), masks=np.zeros((2, 8, 8), np.uint8),
                      density=[0, 0], lesion=[0, 0], subject=[f"s{i}"] * 2, slice_index=[0, 1], source=["x", "y"]))
    w.close({}, {"ranges": {}})
    ss = read_cache(tmp_path/"c")
    assert len(ss) == 6 and (tmp_path/"c"/"images.npy").stat().st_size < 6 * 64 * 4 + 256
    assert np.allclose(ss.images[4], 2 / 3)

# ---------------------------------------------------------------- real files shipped by packages

def test_nifti_mni152_dipy_and_nibabel_files():
    mni = read_volume(_site("nilearn")/"datasets"/"data"/"mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", axis=2)
    S, H, W = mni.data.shape
    assert S == 189 and (H, W) == (233, 197)                 # RAS: axial slices, rows anterior -> posterior
    mid = mni.data[S // 2]
    assert mid[: H // 10].mean() < mid[H // 3: 2 * H // 3].mean()   # air above the head's front, brain in the middle
    s0 = read_any(_site("dipy")/"data"/"files"/"S0_10slices.nii.gz")  # 4-D with one volume: squeezed
    assert s0.data.shape == (10, 128, 128)
    t1 = read_any(_site("dipy")/"data"/"files"/"t1_coronal_slice.npy"); assert t1.data.shape == (1, 256, 256)
    anat = read_any(_site("nibabel")/"tests"/"data"/"anatomical.nii"); assert anat.data.ndim == 3
    par = read_any(_site("nibabel")/"tests"/"data"/"phantom_EPI_asc_CLEAR_2_1.PAR", volume_index=0)
    assert par.data.shape[0] == 9 and np.isfinite(par.data).all()

def test_dicom_bundled_and_compressed():
    from pydicom.data import get_testdata_file
    ref = read_any(get_testdata_file("MR_small.dcm"))
    assert ref.data.shape == (1, 64, 64) and ref.spacing != (1.0, 1.0)
    for n in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(read_any(get_testdata_file(n)).data, ref.data), n
    jls = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    try: read_any(jls)
    except ValueError as e: assert "MR_small_jpeg_ls_lossless.dcm" in str(e) and "JPEG-LS" in str(e)
    trunc = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ValueError, match="MR_truncated.dcm"): read_any(trunc)

def test_folder_of_real_files_end_to_end(tmp_path):
    from pydicom.data import get_testdata_file
    src = tmp_path/"mixed ü folder"; (src/"sub dir").mkdir(parents=True)
    shutil.copy(_site("nibabel")/"tests"/"data"/"anatomical.nii", src/"anat.nii")
    shutil.copy(_site("dipy")/"data"/"files"/"t1_coronal_slice.npy", src/"sub dir"/"t1 é.npy")
    shutil.copy(get_testdata_file("MR_small_RLE.dcm"), src/"mr.dcm")
    rd, msgs = _build(tmp_path, f"folder:{src}")
    ss = load_sliceset(rd)
    assert sorted(set(ss.subject)) == ["anat", "mr", "sub dir/t1 é"]
    assert len(ss) == 25 + 1 + 1 and ss.size == (32, 32)
    assert any(s.endswith("t1 é.npy") for s in ss.source) and any(s.endswith("anat.nii:3") for s in ss.source)
    assert (ss.masks == 1).any() and set(np.unique(ss.masks)) <= {0, 1}     # automatic foreground masks
    assert -1 <= ss.images.min() and ss.images.max() <= 1

# ---------------------------------------------------------------- image folders: bit depth, labels, masks

def test_png_jpeg_tiff_8_and_16_bit_labels_from_folders(tmp_path):
    import tifffile
    src = tmp_path/"imgs"
    _png(src/"fatty"/"a.png", _img(0)); _png(src/"scattered"/"b.png", _img(1, dtype=np.uint16))
    Image.fromarray(_img(2)).save((src/"heterogeneous").mkdir(parents=True) or src/"heterogeneous"/"c.jpg", quality=95)
    (src/"extremely_dense").mkdir(); tifffile.imwrite(src/"extremely_dense"/"d.tif", _img(3, dtype=np.uint16))
    rd, _ = _build(tmp_path, f"folder:{src}", labels_from_folders="density")
    ss = load_sliceset(rd)
    assert dict(zip(ss.subject, ss.density)) == {"fatty/a": 0, "scattered/b": 1, "heterogeneous/c": 2, "extremely_dense/d": 3}
    # 16-bit images keep their dynamic range: after scaling the square is bright and the background dark
    i16 = list(ss.subject).index("extremely_dense/d")
    assert ss.images[i16, 0, 16, 16] > 0.5 and ss.images[i16, 0, 1, 1] < -0.5

def test_labels_csv_masks_and_subject_regex(tmp_path):
    src, msk = tmp_path/"d", tmp_path/"m"
    for i in range(4):
        _png(src/f"pat{i // 2}_img{i}.png", _img(i))
        m = np.zeros((40, 40), np.uint8); m[10:30, 10:30] = L["fgt"]; m[18:22, 18:22] = L["lesion"] * (i % 2)
        _png(msk/f"pat{i // 2}_img{i}.png", m)
    (tmp_path/"labels.csv").write_text("file,density,lesion\n" + "".join(f"pat{i // 2}_img{i}.png,{'abcd'[i]},{i % 2}\n" for i in range(4)))
    rd, _ = _build(tmp_path, f"folder:{src}", labels_csv=str(tmp_path/"labels.csv"), masks=str(msk), subject_regex=r"(pat\d+)_")
    ss = load_sliceset(rd)
    assert sorted(set(ss.subject)) == ["pat0", "pat1"]
    order = np.argsort([Path(s).name for s in ss.source])
    assert ss.density[order].tolist() == [0, 1, 2, 3] and ss.lesion[order].tolist() == [0, 1, 0, 1]
    assert ((ss.masks == L["lesion"]).any((1, 2)) == (ss.lesion == 1)).all()
    assert (ss.masks == L["fgt"]).mean() > 0.1

def test_mixed_sizes_and_rgb_are_said(tmp_path):
    src = tmp_path/"d"
    _png(src/"small.png", _img(0, (30, 30))); _png(src/"big.png", _img(1, (70, 50)))
    _png(src/"colour.png", np.stack([_img(2)] * 3, -1))
    rd, msgs = _build(tmp_path, f"folder:{src}")
    assert any("different sizes" in m and "resized to 32x32" in m for m in msgs), msgs
    assert any("RGB" in m and "colour.png" in m for m in msgs), msgs
    assert len(load_sliceset(rd)) == 3
    assert any("RGB" in n for n in json.loads((rd.root/"data"/"meta.json").read_text())["notes"])

# ---------------------------------------------------------------- bad input: one clear message, nothing half-written

def test_empty_folder(tmp_path):
    (tmp_path/"empty").mkdir(); rd = _run(tmp_path)
    with pytest.raises(ValueError, match=r"empty.*empty"): run_data(rd, f"folder:{tmp_path/'empty'}")
    _failed_cleanly(rd)

def test_non_image_files_skipped_and_counted_error_if_nothing_remains(tmp_path):
    src = tmp_path/"d"; src.mkdir()
    (src/"notes.txt").write_text("x"); (src/"table.json").write_text("{}")
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=r"no readable images.*notes.txt"): run_data(rd, f"folder:{src}")
    _failed_cleanly(rd)
    _png(src/"ok.png", _img(0))
    rd2, msgs = _build(tmp_path, f"folder:{src}", "run2")
    assert any("skipped 2 file(s)" in m for m in msgs) and len(load_sliceset(rd2)) == 1

def test_truncated_png(tmp_path):
    src = tmp_path/"d"; _png(src/"good.png", _img(0))
    rng = np.random.default_rng(0)
    _png(tmp_path/"full.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    (src/"broken.png").write_bytes((tmp_path/"full.png").read_bytes()[:1500])
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=r"broken\.png.*(corrupt|truncated)"): run_data(rd, f"folder:{src}")
    _failed_cleanly(rd)
    (src/"garbage.png").write_bytes(b"this is not a png at all")
    (src/"broken.png").unlink()
    with pytest.raises(ValueError, match=r"garbage\.png"): run_data(rd, f"folder:{src}")

@pytest.mark.parametrize("content,what", [(b"", "0 bytes"), (b"hello, I am text" * 20, "not a DICOM file")])
def test_zero_byte_and_non_dicom_dcm(tmp_path, content, what):
    src = tmp_path/"d"; _png(src/"ok.png", _img(0)); (src/"scan.dcm").write_bytes(content)
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=rf"scan\.dcm.*{what}"): run_data(rd, f"folder:{src}")
    _failed_cleanly(rd)

def _series(folder, zs, missing_pos=None):
    "A small DICOM series with the given slice positions, files named against the order."
    from pydicom.data import get_testdata_file
    import pydicom
    folder.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(zs):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.SeriesInstanceUID = "1.2.3.4.5"; ds.SOPInstanceUID = f"1.2.3.4.5.{k}"; ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]; ds.ImagePositionPatient = [0, 0, float(z)]
        ds.PixelData = (ds.pixel_array + 100 * k).astype(ds.pixel_array.dtype).tobytes()
        if missing_pos == k: del ds.ImagePositionPatient
        ds.save_as(folder/f"IM{len(zs) - k:03d}.dcm")

def test_dicom_series_ordered_by_position(tmp_path):
    _series(tmp_path/"s", [0, 3, 6, 9])
    files = sorted((tmp_path/"s").glob("*.dcm"))                    # names run against the positions
    v = read_dicom_series(files)
    assert v.extra["positions"] == [0, 3, 6, 9]
    assert np.all(np.diff(v.data.mean((1, 2))) > 50)                # pixel offsets 0, 100, 200, 300 in position order

@pytest.mark.parametrize("zs,missing,match", [([0, 3, 3, 9], None, "duplicated slice position"),
                                              ([0, 3, 6, 15], None, "missing slice"),
                                              ([0, 3, 6, 9], 2, "no ImagePositionPatient")])
def test_dicom_series_with_bad_positions(tmp_path, zs, missing, match):
    _series(tmp_path/"d"/"ser ies", zs, missing)
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=rf"IM\d+\.dcm.*{match}|{match}"): run_data(rd, f"folder:{tmp_path/'d'}")
    _failed_cleanly(rd)
    if match == "missing slice": assert len(read_dicom_series(sorted((tmp_path/"d"/"ser ies").glob("*.dcm")), allow_gaps=True).data) == 4

def test_nifti_nan_inf_cleaned_or_rejected(tmp_path):
    import nibabel as nib
    src = tmp_path/"d"; src.mkdir()
    a = np.random.default_rng(0).random((20, 20, 4)).astype(np.float32); a[3, 4, 1] = np.nan; a[5, 5, 2] = np.inf
    nib.save(nib.Nifti1Image(a, np.eye(4)), src/"vol.nii.gz")
    rd, msgs = _build(tmp_path, f"folder:{src}")
    assert any("vol.nii.gz" in m and "2 NaN/Inf voxel(s) cleaned" in m for m in msgs), msgs
    assert np.isfinite(load_sliceset(rd).images).all()
    rd2 = _run(tmp_path, "run2")
    with pytest.raises(ValueError, match=r"vol\.nii\.gz.*2 NaN/Inf.*rejected"): run_data(rd2, f"folder:{src}", nonfinite="reject")
    _failed_cleanly(rd2)

def test_4d_volume(tmp_path):
    src = tmp_path/"d"; src.mkdir()
    shutil.copy(_site("nibabel")/"tests"/"data"/"example4d.nii.gz", src/"fmri.nii.gz")
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=r"fmri\.nii\.gz.*4-D volume.*volume_index"): run_data(rd, f"folder:{src}")
    _failed_cleanly(rd)
    rd2, _ = _build(tmp_path, f"folder:{src}", "run2", volume_index=1)
    assert len(load_sliceset(rd2)) == 24

def test_labels_csv_naming_missing_files(tmp_path):
    src = tmp_path/"d"; _png(src/"a.png", _img(0))
    (tmp_path/"labels.csv").write_text("file,density\na.png,1\nghost.png,2\n")
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match=r"labels.csv.*1 file\(s\).*ghost\.png"):
        run_data(rd, f"folder:{src}", labels_csv=str(tmp_path/"labels.csv"))
    _failed_cleanly(rd)

def test_bad_source_and_options(tmp_path):
    rd = _run(tmp_path)
    with pytest.raises(ValueError, match="folder:PATH"): run_data(rd, "s3://bucket")
    with pytest.raises(FileNotFoundError, match="nowhere"): run_data(rd, f"folder:{tmp_path/'nowhere'}")
    with pytest.raises(ValueError, match="do not apply"): run_data(rd, "phantom", axis=1)

def test_cli_reports_errors_and_notes(tmp_path):
    src = tmp_path/"d"; _png(src/"a.png", _img(0)); (src/"x.txt").write_text("x")
    r = _cli("data", "--data", f"folder:{src}", "--profile", "smoke", "--out", tmp_path/"r")
    # the loaders' notes come as "note: ..." lines before the report ("data: done; in RUN" and the stage summary as JSON)
    assert r.returncode == 0 and "note: " in r.stdout and "skipped 1 file" in r.stdout, (r.stdout, r.stderr)
    assert "data: done; in " in r.stdout and '"n": 1' in r.stdout, (r.stdout, r.stderr)
    r = _cli("data", "--data", f"folder:{tmp_path/'none'}", "--out", tmp_path/"r2")
    assert r.returncode == 2 and "does not exist" in r.stderr

# ---------------------------------------------------------------- the Duke layout

@pytest.fixture(scope="module")
def duke(tmp_path_factory):
    "The collection as it ships (manifest-*/metadata.csv, Duke-Breast-Cancer-MRI/..., the spreadsheets, Segmentation_Masks_NRRD/)."
    return write_duke_example(tmp_path_factory.mktemp("duke")/"download", n_patients=4, slices=8, size=32)

def _check_duke_slices(ss, duke):
    "Every patient's pre-contrast series in position order, lesion labels from the boxes, FGT/vessel masks from the segmentations."
    assert sorted(set(ss.subject)) == sorted(duke["truth"]) and len(ss) == 8 * len(duke["truth"])
    for pid, t in duke["truth"].items():
        sel = np.flatnonzero(ss.subject == pid)
        assert ss.slice_index[sel].tolist() == list(range(8)) and all("ax dyn pre" in s for s in ss.source[sel])
        # slices in position order (the files run against it): the preprocessed images equal the phantom's, scaled the same way
        x = t["images"]; lo, hi = np.percentile(x * 1000, (0.5, 99.5))
        assert np.abs(ss.images[sel, 0] - (np.clip((x * 1000 - lo) / (hi - lo), 0, 1) * 2 - 1)).max() < 0.01
        assert ss.lesion[sel].tolist() == (t["masks"] == L["lesion"]).any((1, 2)).astype(int).tolist()
        outside = ss.masks[sel] != L["lesion"]
        for lab in ("fgt", "vessel"): assert ((ss.masks[sel] == L[lab]) == (t["masks"] == L[lab]))[outside].all()

def test_duke_pre_contrast_ordered_by_position_with_boxes_and_segmentations(tmp_path, duke):
    rd, msgs = _build(tmp_path, f"duke:{duke['root']}", annotations=str(duke["annotations"]), segmentations=str(duke["segmentations"]))
    ss = load_sliceset(rd)
    assert sorted(set(ss.subject)) == [f"Breast_MRI_{i:03d}" for i in range(1, 5)] and len(ss) == 32
    _check_duke_slices(ss, duke)
    assert (ss.category == -1).all() and ss.category_names == ()      # no clinical sheet: no classes

def test_duke_post_contrast_and_patient_without_series(tmp_path, duke):
    root = tmp_path/"Duke"; shutil.copytree(duke["root"], root)
    # patient 4 loses its post-contrast series
    for p in (root/"Breast_MRI_004").rglob("*1st pass*"): shutil.rmtree(p)
    rd, msgs = _build(tmp_path, f"duke:{root}", series_pattern="post1")
    ss = load_sliceset(rd)
    assert "Breast_MRI_004" not in set(ss.subject) and all("1st pass" in s for s in ss.source)
    assert any("Breast_MRI_004" in m and "no series matches" in m for m in msgs), msgs
    assert (ss.lesion == -1).all()       # no annotation table: unknown
    rd2 = _run(tmp_path, "r2")
    with pytest.raises(ValueError, match="no patient has a series matching"): run_data(rd2, f"duke:{root}", series_pattern="sagittal")
    _failed_cleanly(rd2)

def test_duke_annotations_csv_and_position_order(tmp_path, duke):
    import pandas as pd
    df = pd.read_excel(duke["annotations"]); csvp = tmp_path/"boxes.csv"; df.to_csv(csvp, index=False)
    a, _ = _build(tmp_path, f"duke:{duke['root']}", "a", annotations=str(csvp))
    b, _ = _build(tmp_path, f"duke:{duke['root']}", "b", annotations=str(csvp), annotation_slice_order="position")
    la, lb = load_sliceset(a), load_sliceset(b)
    truth = np.concatenate([(duke["truth"][s]["masks"] == L["lesion"]).any((1, 2)) for s in sorted(duke["truth"])])
    order = np.lexsort((la.slice_index, la.subject))
    assert np.array_equal(la.lesion[order], truth.astype(int))       # instance order: right
    assert not np.array_equal(lb.lesion[order], truth.astype(int))   # position order: the box lands on the wrong slices
    bad = tmp_path/"bad.csv"; bad.write_text("Patient ID,Start Row\nBreast_MRI_001,3\n")
    rd = _run(tmp_path, "c")
    with pytest.raises(ValueError, match=r"bad\.csv.*lacks column"): run_data(rd, f"duke:{duke['root']}", annotations=str(bad))

def test_duke_cli(tmp_path, duke):
    r = _cli("data", "--data", f"duke:{duke['root']}", "--profile", "smoke", "--out", tmp_path/"r",
             "--annotations", duke["annotations"], "--segmentations", duke["segmentations"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path/"r"/"data"/"split.json").exists() and len(load_sliceset(tmp_path/"r")) == 32

def test_duke_shipped_layout_cli(tmp_path, duke):
    man = duke["manifest"]
    assert man.name.startswith("manifest-") and (man/"metadata.csv").is_file() and duke["root"] == man/"Duke-Breast-Cancer-MRI"
    pre = sorted((duke["root"]/"Breast_MRI_001").glob("01-01-1990-NA-MRI BREAST BILATERAL W  WO-*/3.000000-ax dyn pre-*"))
    assert len(pre) == 1 and re.fullmatch(r"3\.000000-ax dyn pre-\d{5}", pre[0].name)
    assert sorted(p.name for p in pre[0].iterdir()) == [f"1-{i:02d}.dcm" for i in range(1, 9)]
    r = _cli("data", "--out", tmp_path/"r", "--profile", "smoke", "--data", f"duke:{man}", "--annotations", duke["annotations"],
             "--segmentations", duke["segmentations"], "--clinical", duke["clinical"], "--clinical-label", "Mol Subtype")
    assert r.returncode == 0, r.stderr
    assert "not in the table" not in r.stdout and "incomplete download" not in r.stdout, r.stdout
    ss = load_sliceset(tmp_path/"r")
    _check_duke_slices(ss, duke)
    # the sheet's codes {0 = luminal-like, 1 = ER/PR pos, HER2 pos, 2 = her2, 3 = trip neg} decoded; patient 4's blank cell is unknown
    assert ss.category_names == ("ER/PR pos, HER2 pos", "luminal-like", "trip neg")
    want = {"Breast_MRI_001": "luminal-like", "Breast_MRI_002": "ER/PR pos, HER2 pos", "Breast_MRI_003": "trip neg", "Breast_MRI_004": None}
    assert duke["classes"] == want
    for pid, name in want.items():
        assert ss.category[ss.subject == pid].tolist() == [-1 if name is None else ss.category_names.index(name)] * 8
    assert json.loads((tmp_path/"r"/"data"/"split.json").read_text())["stratified_by"] == "category"
    # the collection folder itself reads the same
    rd, _ = _build(tmp_path, f"duke:{duke['root']}", "c", annotations=str(duke["annotations"]), segmentations=str(duke["segmentations"]),
                   clinical=str(duke["clinical"]), clinical_label="Mol Subtype")
    sc = load_sliceset(rd)
    assert np.array_equal(sc.images, ss.images) and np.array_equal(sc.category, ss.category) and sc.category_names == ss.category_names

def test_duke_clinical_errors(tmp_path, duke):
    r = _cli("data", "--out", tmp_path/"r", "--profile", "smoke", "--data", f"duke:{duke['manifest']}",
             "--clinical", duke["clinical"], "--clinical-label", "Subtype")
    assert r.returncode == 2 and "Clinical_and_Other_Features.xlsx" in r.stderr and "no column 'Subtype'" in r.stderr, r.stderr
    assert "'Mol Subtype'" in r.stderr and "'HER2'" in r.stderr and "'Days to MRI (From the Date of Diagnosis)'" in r.stderr, r.stderr
    rd = _run(tmp_path, "a")
    with pytest.raises(ValueError, match=r"Clinical_and_Other_Features\.xlsx: say which column.*'Mol Subtype'"):
        run_data(rd, f"duke:{duke['manifest']}", clinical=str(duke["clinical"]))
    _failed_cleanly(rd)
    with pytest.raises(ValueError, match="needs clinical"): run_data(_run(tmp_path, "b"), f"duke:{duke['manifest']}", clinical_label="ER")
    with pytest.raises(ValueError, match=r"Annotation_Boxes\.xlsx: no column 'ER'.*'Start Row'"):
        run_data(_run(tmp_path, "c"), f"duke:{duke['manifest']}", clinical=str(duke["annotations"]), clinical_label="ER")
    # a code outside the sheet's coding is kept as written, with a note naming the file
    import openpyxl
    wb = openpyxl.load_workbook(duke["clinical"]); ws = wb.active
    col = [c.value for c in ws[2]].index("Mol Subtype") + 1
    ws.cell(row=4, column=col, value=7); odd = tmp_path/"odd.xlsx"; wb.save(odd)
    rd, msgs = _build(tmp_path, f"duke:{duke['manifest']}", "d", clinical=str(odd), clinical_label="Mol Subtype")
    assert load_sliceset(rd).category_names == ("7", "ER/PR pos, HER2 pos", "trip neg")
    assert any("odd.xlsx" in m and "Breast_MRI_001: '7'" in m for m in msgs), msgs

def test_duke_incomplete_download_noted(tmp_path, duke):
    man = tmp_path/duke["manifest"].name; shutil.copytree(duke["manifest"], man)
    pre = next((man/"Duke-Breast-Cancer-MRI"/"Breast_MRI_002").rglob("3.000000-ax dyn pre-*"))
    (pre/"1-08.dcm").unlink()          # the last file: no gap between the slices left, only metadata.csv can tell
    rd, msgs = _build(tmp_path, f"duke:{man}")
    assert (load_sliceset(rd).subject == "Breast_MRI_002").sum() == 7
    assert any("Breast_MRI_002" in m and "holds 7 DICOM file(s)" in m and "metadata.csv lists 8" in m for m in msgs), msgs
