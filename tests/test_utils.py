import numpy as np
import pytest
import torch

import benchmark
import run_files
import utils
from conftest import CodeOnLoad, assert_one_line_error, run_as_command
from model import BACKBONES, SHARE_TYPES


# ----------------------------------------------------------------------------- create_id

@pytest.mark.parametrize('M, C, E', [(12, 98, 48), (4, 10, 3), (3, 7, 5), (5, 100, 4)])
def test_fixed_ids_are_balanced_with_unique_codes(M, C, E):
    ids = utils.create_id(M, C, E, generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (E, C)
    for row in ids:
        counts = torch.bincount(row, minlength=M)
        assert counts.min() >= C // M and counts.max() <= -(-C // M)
    assert torch.unique(ids, dim=1).shape[1] == C


def test_fixed_ids_complete_with_unused_codes_when_codes_are_scarce():
    # 2**7 = 128 codes for 128 classes: random balanced rows almost never give distinct codes
    ids = utils.create_id(2, 128, 7, generator=torch.Generator().manual_seed(0))
    assert torch.unique(ids, dim=1).shape[1] == 128
    assert ids.min() >= 0 and ids.max() <= 1


@pytest.mark.parametrize('M, C, E', [(12, 98, 48), (5, 40, 6), (3, 7, 5)])
def test_random_ids_are_balanced_rows(M, C, E):
    """As the original's create_random_id: every row balanced like fixed's, only the codes left unchecked."""
    ids = utils.create_id(M, C, E, label_type='random', generator=torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (E, C)
    for row in ids:
        counts = torch.bincount(row, minlength=M)
        assert len(counts) == M and counts.min() >= C // M and counts.max() <= -(-C // M)
    assert len({tuple(row) for row in ids.tolist()}) == E  # each member its own grouping


def test_random_ids_do_not_force_distinct_codes():
    # 2 meta-classes, 3 members: 8 codes for 8 classes; fixed makes them distinct, random leaves collisions
    generator = torch.Generator().manual_seed(0)
    codes = [torch.unique(utils.create_id(2, 8, 3, 'random', generator), dim=1).shape[1] for _ in range(20)]
    assert min(codes) < 8


def test_ids_follow_the_generator():
    a = utils.create_id(4, 20, 3, generator=torch.Generator().manual_seed(7))
    b = utils.create_id(4, 20, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize('M, C, E, message', [(13, 12, 4, 'larger than the number of training classes'),
                                              (2, 100, 6, 'distinct codes'),
                                              (0, 10, 2, '>= 1')])
def test_create_id_errors(M, C, E, message):
    with pytest.raises(ValueError, match=message):
        utils.create_id(M, C, E)


# ----------------------------------------------------------------------------- sampling and transforms

def test_sample_train_images_caps_classes_reproducibly():
    train = {'b': [f'b/{i}.jpg' for i in range(10)], 'a': ['a/0.jpg', 'a/1.jpg']}
    first = utils.sample_train_images(train, torch.Generator().manual_seed(3), max_per_class=4)
    second = utils.sample_train_images(train, torch.Generator().manual_seed(3), max_per_class=4)
    assert first == second
    assert first[:2] == [('a/0.jpg', 0), ('a/1.jpg', 0)]
    assert [c for _, c in first].count(1) == 4 and len(set(first)) == 6


@pytest.mark.parametrize('crop_type', utils.CROP_TYPES)
@pytest.mark.parametrize('train', [True, False])
def test_transforms_give_square_normalized_tensors(crop_type, train):
    from PIL import Image
    image = Image.new('RGB', (50, 30), (255, 128, 0))
    tensor = utils.get_transform(crop_type, train, 24, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])(image)
    assert tensor.shape == (3, 24, 24)
    assert tensor[0].mean().item() == pytest.approx((1 - 0.5) / 0.25, abs=1e-5)


# ----------------------------------------------------------------------------- metrics

def oracle(queries, query_labels, gallery, gallery_labels, ks, self_retrieval):
    """Brute force: the full similarity matrix and a sorted ranking of every query's gallery, other-class
    items first among equal scores (ties never help), then the metric definitions."""
    sims = (queries @ gallery.T).tolist()
    hits, aps, rps = [0] * len(ks), [], []
    for q in range(len(queries)):
        ranked = sorted((-sims[q][g], int(gallery_labels[g] == query_labels[q]), g) for g in range(len(gallery))
                        if not (self_retrieval and g == q))
        relevant = [same for _, same, _ in ranked]
        for i, k in enumerate(ks):
            hits[i] += int(any(relevant[:k]))
        r = sum(relevant)
        if r:
            precisions = [sum(relevant[:i + 1]) / (i + 1) * relevant[i] for i in range(r)]
            aps.append(sum(precisions) / r)
            rps.append(sum(relevant[:r]) / r)
    return [h / len(queries) for h in hits], sum(aps) / len(aps), sum(rps) / len(rps)


def random_embeddings(n, d, num_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, d, generator=generator)
    labels = torch.randint(num_classes, (n,), generator=generator)
    vectors = centres[labels] + 1.5 * torch.randn(n, d, generator=generator)
    return torch.nn.functional.normalize(vectors, dim=1), labels


@pytest.mark.parametrize('chunk_size', [None, 7])
def test_self_retrieval_matches_oracle(chunk_size):
    vectors, labels = random_embeddings(120, 16, 30, seed=0)  # some classes hold a single image
    ks = [1, 2, 4, 8, 500]
    recalls, map_r, rp = utils.retrieval_metrics(vectors, labels, ks, chunk_size=chunk_size)
    expected = oracle(vectors, labels, vectors, labels, ks, True)
    assert recalls == pytest.approx(expected[0]) and map_r == pytest.approx(expected[1])
    assert rp == pytest.approx(expected[2])
    assert recalls[-1] < 1  # single-image classes are misses even when K exceeds the gallery


@pytest.mark.slow
def test_many_hard_queries_need_full_counts():
    """Over 256 queries whose best same-class item is outside their top R, with K beyond R."""
    vectors, labels = random_embeddings(700, 4, 200, seed=3)
    ks = [1, 3, 50, 1000]
    expected = oracle(vectors, labels, vectors, labels, ks, True)
    recalls, map_r, rp = utils.retrieval_metrics(vectors, labels, ks, chunk_size=700)
    assert recalls == pytest.approx(expected[0]) and (map_r, rp) == pytest.approx(expected[1:])


def test_query_gallery_matches_oracle():
    vectors, labels = random_embeddings(150, 8, 20, seed=1)
    queries, query_labels, gallery, gallery_labels = vectors[:60], labels[:60], vectors[60:], labels[60:]
    ks = [1, 3, 10]
    recalls = utils.recall(queries, query_labels.tolist(), ks, gallery, gallery_labels.tolist(), chunk_size=16)
    map_r, rp = utils.map_at_r(queries, query_labels, gallery, gallery_labels, chunk_size=16)
    expected = oracle(queries, query_labels, gallery, gallery_labels, ks, False)
    assert recalls == pytest.approx(expected[0])
    assert (map_r, rp) == pytest.approx(expected[1:])


@pytest.mark.parametrize('self_retrieval', [True, False])
def test_many_ties_match_the_tie_aware_oracle(self_retrieval):
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randint(-1, 2, (90, 3), generator=generator).float()  # few distinct scores: ties everywhere
    labels = torch.randint(6, (90,), generator=generator)
    ks = [1, 2, 5, 20]
    if self_retrieval:
        got = utils.retrieval_metrics(vectors, labels, ks, chunk_size=16)
        expected = oracle(vectors, labels, vectors, labels, ks, True)
    else:
        got = utils.retrieval_metrics(vectors[:40], labels[:40], ks, vectors[40:], labels[40:], chunk_size=16)
        expected = oracle(vectors[:40], labels[:40], vectors[40:], labels[40:], ks, False)
    assert got[0] == pytest.approx(expected[0])
    assert got[1:] == pytest.approx(expected[1:])


def test_hand_computed_case_with_ties():
    # 1-D embeddings: scores are products, so ties are easy to build
    vectors = torch.tensor([[1.0], [1.0], [1.0], [-1.0]])
    labels = [0, 1, 0, 1]
    # query 0: gallery 1 (other class) and 2 (same) tie at 1 -> the other class ranks first: hit at K=2 only
    # query 1: its same-class item 3 scores -1, below items 0 and 2 (1): hit at K=3
    # query 3: its same-class item 1 scores -1, tied with items 0 and 2 (other class): hit at K=3
    assert utils.recall(vectors, labels, [1, 2, 3]) == pytest.approx([0, 2 / 4, 1])
    map_r, rp = utils.map_at_r(vectors, labels)
    assert (map_r, rp) == (0.0, 0.0)  # every query's one same-class item ranks below R = 1


@pytest.mark.parametrize('value', [0.0, 0.5])
def test_degenerate_embeddings_score_zero(value):
    """A collapsed model (all embeddings equal, or all zero) ranks every same-class item after every other
    item: no recall below the number of other-class items, no MAP@R."""
    labels = torch.arange(40) % 8                                  # 5 images per class: 35 other-class items
    vectors = torch.full((40, 6), value)
    recalls, map_r, rp = utils.retrieval_metrics(vectors, labels, [1, 8, 35, 36], chunk_size=16)
    assert recalls == [0.0, 0.0, 0.0, 1.0]
    assert (map_r, rp) == (0.0, 0.0)
    recalls, map_r, rp = utils.retrieval_metrics(vectors[:8], labels[:8], [1, 7], vectors[8:], labels[8:])
    assert recalls == [0.0, 0.0] and (map_r, rp) == (0.0, 0.0)  # 28 other-class gallery items


def test_no_positive_queries_are_left_out_of_map():
    vectors = torch.eye(3)
    assert utils.map_at_r(vectors, [0, 1, 2]) == (0.0, 0.0)
    assert utils.recall(vectors, [0, 1, 2], [1, 5]) == [0.0, 0.0]
    map_r, rp = utils.map_at_r(torch.tensor([[1.0, 0], [1, 0], [0, 1]]), [0, 0, 1])
    assert (map_r, rp) == (1.0, 1.0)


def test_metric_input_errors():
    with pytest.raises(ValueError, match='non-empty'):
        utils.recall(torch.empty(0, 4), [], [1])
    with pytest.raises(ValueError, match='labels'):
        utils.recall(torch.randn(5, 4), [0, 1], [1])
    with pytest.raises(ValueError, match='gallery_labels'):
        utils.recall(torch.randn(5, 4), [0] * 5, [1], torch.randn(3, 4), [0, 1])
    with pytest.raises(ValueError, match='rank'):
        utils.recall(torch.randn(5, 4), [0] * 5, [0])
    with pytest.raises(ValueError, match='NaN'):
        utils.recall(torch.full((5, 4), float('nan')), [0] * 5, [1])
    with pytest.raises(ValueError, match='NaN'):
        utils.recall(torch.randn(5, 4), [0] * 5, [1], torch.tensor([[float('inf')] * 4]), [0])


# ----------------------------------------------------------------------------- safe loading

def test_safe_load_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / 'evil.pth'
    torch.save({'model': CodeOnLoad(print, 'code ran')}, path)
    with pytest.raises(utils.ReirError, match='refused'):
        utils.safe_load(str(path), 'checkpoint')
    assert 'code ran' not in capsys.readouterr().out


def test_safe_load_reports_truncated_files(tmp_path):
    path = tmp_path / 'cut.pth'
    torch.save({'x': torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(utils.ReirError, match='corrupt'):
        utils.safe_load(str(path))


def test_safe_load_reads_the_format_before_pytorch_1_6_and_refuses_what_it_should(tmp_path, capsys):
    """The original REIR saved its models with PyTorch 1.3: not zip archives. They load; code, garbage and a
    truncation in that format are refused as in the zip format."""
    path = tmp_path / 'old.pth'
    torch.save({'w': torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(utils.safe_load(str(path), 'model', mmap=True)['w'], torch.arange(4.0))
    torch.save({'model': CodeOnLoad(print, 'code ran')}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(utils.ReirError, match='refused to load model, which could run code'):
        utils.safe_load(str(path), 'model')
    assert 'code ran' not in capsys.readouterr().out
    for content in (b'hello world, not a pickle' * 4, b'\x80\x02garbage'):
        path.write_bytes(content)
        with pytest.raises(utils.ReirError, match='corrupt or truncated'):
            utils.safe_load(str(path), 'model')
    torch.save({'w': torch.zeros(1000)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(utils.ReirError, match='corrupt or truncated'):
        utils.safe_load(str(path), 'model')


def test_safe_load_refuses_flipped_bits(tmp_path):
    """4 KB flipped inside a tensor's bytes still unpickle; the zip checksums catch them."""
    path = tmp_path / 'model.pth'
    torch.save({'w': torch.randn(50_000)}, path)
    data = bytearray(path.read_bytes())
    data[100_000:104_096] = bytes(b ^ 0xFF for b in data[100_000:104_096])
    path.write_bytes(bytes(data))
    with pytest.raises(utils.ReirError, match='checksum'):
        utils.safe_load(str(path), 'model')


@pytest.mark.parametrize('failure, error', [(KeyboardInterrupt, KeyboardInterrupt),
                                            (OSError(28, 'No space left on device'), utils.ReirError)])
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, failure, error):
    path = tmp_path / 'results.csv'
    path.write_text('old')

    def failing(tmp):
        with open(tmp, 'w') as f:
            f.write('half')
        raise failure
    with pytest.raises(error):
        run_files.atomic_write(str(path), failing)
    assert path.read_text() == 'old' and len(list(tmp_path.iterdir())) == 1


def test_a_failed_save_keeps_the_previous_set_of_files(tmp_path):
    """The model is written, the database fails (a full disk): neither file changes."""
    model, database = tmp_path / 'model.pth', tmp_path / 'data_base.pth'
    model.write_text('epoch 1')
    database.write_text('epoch 1')

    def full_disk(tmp):
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')
    with pytest.raises(utils.ReirError, match=r'could not write .*data_base.pth \(PytorchStreamWriter'):
        run_files.save_together({str(model): lambda tmp: open(tmp, 'w').write('epoch 2'), str(database): full_disk})
    assert model.read_text() == database.read_text() == 'epoch 1'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data_base.pth', 'model.pth']


# ----------------------------------------------------------------------------- the input pipeline

def photo(path, size=(1000, 700), seed=0):
    return benchmark.photo(path, *size, np.random.default_rng(seed))


def psnr(a, b):
    return float(10 * torch.log10(1 / torch.mean((a - b) ** 2)))


@pytest.mark.parametrize('crop_type', utils.CROP_TYPES)
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('size', [(1000, 700), (300, 410), (256, 300)])
def test_fast_transform_matches_the_original(tmp_path, crop_type, train, size):
    """Same seed, same crop; the single region resize equals resize-then-crop up to float rounding."""
    image = utils.load_rgb(photo(str(tmp_path / 'p.jpg'), size))
    raw = dict(mean=[0, 0, 0], std=[1, 1, 1])
    torch.manual_seed(5)
    exact = utils.get_transform(crop_type, train, 256, exact=True, **raw)(image)
    torch.manual_seed(5)
    fast = utils.get_transform(crop_type, train, 256, **raw)(image)
    assert fast.shape == exact.shape == (3, 256, 256) and fast.dtype == exact.dtype == torch.float32
    assert (fast - exact).abs().max() <= 2 / 255 and psnr(fast, exact) > 45


def test_normalization_matches_the_original(tmp_path):
    image = utils.load_rgb(photo(str(tmp_path / 'p.jpg')))
    stats = dict(mean=[0.4707, 0.4601, 0.4549], std=[0.2767, 0.2760, 0.2850])
    exact = utils.get_transform('uncropped', False, 128, exact=True, **stats)(image)
    fast = utils.get_transform('uncropped', False, 128, **stats)(image)
    assert torch.allclose(exact.mean((1, 2)), fast.mean((1, 2)), atol=1e-3)
    assert torch.allclose(exact.std((1, 2)), fast.std((1, 2)), atol=1e-3)


@pytest.mark.parametrize('crop_type', utils.CROP_TYPES)
def test_reduced_scale_decoding_stays_close_to_the_full_decode(tmp_path, crop_type):
    path = photo(str(tmp_path / 'p.jpg'), seed=1)
    raw = dict(mean=[0, 0, 0], std=[1, 1, 1])
    transform = utils.get_transform(crop_type, False, 256, **raw)
    with __import__('PIL').Image.open(path) as image:
        image.draft('RGB', (256, 256))
        assert image.size == (500, 350)  # decoded at half scale
    full = transform(utils.load_rgb(path))
    reduced = transform(utils.load_rgb(path, min_side=256))
    assert psnr(full, reduced) >= 30
    small = photo(str(tmp_path / 's.jpg'), size=(400, 300))  # under twice the target: decoded whole
    assert utils.load_rgb(small, min_side=256).size == (400, 300)


def test_augmentation_is_reproducible_from_the_sample_seed(tmp_path):
    paths = [photo(str(tmp_path / f'{i}.jpg'), size=(320, 240), seed=i) for i in range(3)]
    reader = utils.TrainReader('', [(p, 0) for p in paths], [torch.zeros(2, dtype=torch.long)] * 3,
                               utils.get_transform('uncropped', True, 64, [0, 0, 0], [1, 1, 1]), min_side=64)
    first, second, other = reader[(1, 1234)][0], reader[(1, 1234)][0], reader[(1, 999)][0]
    assert torch.equal(first, second) and not torch.equal(first, other)


# ----------------------------------------------------------------------------- file names and the command line

@pytest.mark.parametrize('data_name', ['cub', 'my_photos_2024', 'x_uncropped_fixed'])
@pytest.mark.parametrize('model_type', list(BACKBONES))
def test_run_names_parse_back(data_name, model_type):
    for with_random in (False, True):
        for share_type in SHARE_TYPES:
            run = run_files.RunName(data_name, 'cropped', 'random', with_random, share_type, model_type, 48, 12)
            assert run_files.RunName.parse(run.prefix) == run
    assert run_files.RunName.parse('cub_uncropped_fixed_unrandom_layer1_resnet19_48_12') is None
    assert run_files.RunName.parse('cub_uncropped_fixed_unrandom_layer1_resnet18_48') is None


@pytest.mark.parametrize('script, args, code, fragment', [
    ('train.py', ['--data_path', 'missing', '--data_name', 'cub', '--num_workers', '0'], 1, 'data_utils.py'),
    ('data_utils.py', ['--data_path', 'missing'], 1, 'not found'),
    ('evaluate.py', ['missing/something.pth'], 2, 'prefix'),
    ('inference.py', ['--query_img_name', 'x.jpg', '--data_base', 'missing/x_data_base.pth'], 1, 'not found'),
    ('architecture.py', ['--output', 'a_file/figure.png'], 1, 'could not write a_file/figure.png')])
def test_every_script_reports_a_user_error_in_one_line(tmp_path, script, args, code, fragment):
    """Each script, run as `python script ...` runs it, ends a user's error with one line and its exit code."""
    (tmp_path / 'a_file').write_text('not a folder')
    assert_one_line_error(run_as_command(script, *args, cwd=tmp_path), code, fragment)
