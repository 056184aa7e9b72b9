"""index.py: a folder of one's own images embedded by a trained run into a gallery that inference.py searches,
evaluate.py scores (labelled) and ablation.py compares; written in parts that a stop or a kill continues from, updated
with the files added, changed and removed, equal to one pass; faiss beside it; bad input in one line."""
import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data_base
import engine
import faiss_search
import figures
import folder_index
import run_files
from conftest import (REPO, assert_one_line_error, copy_of_run, prefix, run_main, signal_during_call, write_image)


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the session's tiny run: its results folder."""
    return copy_of_run(trained, tmp_path)


@pytest.fixture
def photos(trained, tmp_path):
    """A folder of images in class folders: the tiny dataset's test and training images (28)."""
    folder = tmp_path / 'photos'
    for split in ('test', 'train'):
        for source in sorted((trained / 'data' / 'tiny' / split).iterdir()):
            shutil.copytree(source, folder / f'{split}_{source.name}')
    return folder


def index_of(run, folder, *flags):
    return run_main('index', run / f'{prefix()}_model.pth', '--images', folder, '--num_workers', '0', *flags)


def stored(path):
    return torch.load(path, weights_only=True)


def assert_same_index(path, reference):
    """The two indexes hold the same images, classes, embeddings and file records."""
    a, b = stored(path), stored(reference)
    for key in ('test_images', 'test_labels', 'model_fingerprint', 'settings'):
        assert a[key] == b[key], key
    assert torch.equal(a['test_features'], b['test_features'])
    for key in ('files', 'unreadable', 'labels', 'source', 'faiss'):
        assert a['index'][key] == b['index'][key], key


def test_a_labelled_index_of_the_test_images_is_scored_as_the_run_scored_them(run, trained, tmp_path):
    folder = shutil.copytree(trained / 'data' / 'tiny' / 'test', tmp_path / 'test')
    result = index_of(run, folder, '--labels', 'folders')
    assert result.returncode == 0, result.stderr
    path = run / f'{prefix()}_test_index.pth'
    index, database = stored(path), stored(run / f'{prefix()}_data_base.pth')
    assert [os.path.relpath(p, folder) for p in index['test_images']] == \
        [os.path.relpath(p, trained / 'data' / 'tiny' / 'test') for p in database['test_images']]
    assert index['test_labels'] == database['test_labels']
    assert torch.equal(index['test_features'], database['test_features'])
    assert index['model_fingerprint'] == database['model_fingerprint']
    assert not os.path.exists(folder_index.parts_folder(str(path)))
    own_scores = run / f'{prefix()}_eval.csv'
    before = own_scores.read_bytes() if own_scores.exists() else None
    scored = run_main('evaluate', path)
    assert scored.returncode == 0, scored.stderr
    rows = list(csv.DictReader(open(run / f'{prefix()}_results.csv')))
    selected = run_files.selected_row([{k: float(v) for k, v in row.items()} for row in rows])
    written = next(csv.DictReader(open(run / f'{prefix()}_test_index_eval.csv')))
    assert {k: round(float(v), 4) for k, v in written.items()} == \
        {k: round(v, 4) for k, v in selected.items() if k.startswith('test_')}
    assert (own_scores.read_bytes() if own_scores.exists() else None) == before  # the run's own, not replaced


def test_unreadable_files_are_listed_and_left_out(run, photos):
    (photos / 'test_class_00' / 'notes.txt').write_text('not an image')
    (photos / 'test_class_01' / 'cut.jpg').write_bytes((photos / 'test_class_01' / '0.jpg').read_bytes()[:300])
    os.symlink(photos / 'gone.jpg', photos / 'test_class_02' / 'link.jpg')
    (photos / 'test_class_02' / '.DS_Store').write_bytes(b'\0')
    (photos / 'test_class_02' / 'half.jpg.tmp').write_bytes(b'\0')
    result = index_of(run, photos, '--labels', 'folders')
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if 'unreadable' in line)
    assert 'left out 3 unreadable files' in warning
    for name in ('notes.txt', 'cut.jpg', 'link.jpg'):
        assert name in warning
    index = stored(run / f'{prefix()}_photos_index.pth')
    assert len(index['test_images']) == 28 and len(index['index']['unreadable']) == 3
    assert sorted(set(index['test_labels'])) == sorted(p.name for p in photos.iterdir())
    assert '28 images of 7 classes' in result.stdout


@pytest.mark.slow
def test_a_stop_signal_writes_the_batches_done_and_the_same_command_continues(run, photos, tmp_path, monkeypatch):
    """SIGTERM during the fifth batch (batches of 3, parts of 8 batches): the four batches before it and the fifth are
    written as a part, exit 75; the same command continues to the index one pass writes."""
    function = signal_during_call(monkeypatch, engine, 'embed_batch', 5, signal.SIGTERM)
    result = index_of(run, photos, '--batch_size', '3')
    assert result.returncode == 75, result.stderr
    assert 'stopped by SIGTERM with 15 of 28 files embedded: run the same command to continue' in result.stderr
    path = run / f'{prefix()}_photos_index.pth'
    assert not path.exists() and len(os.listdir(folder_index.parts_folder(str(path)))) == 1
    monkeypatch.setattr(engine, 'embed_batch', function)
    calls = []
    monkeypatch.setattr(engine, 'embed_batch', lambda *a: calls.append(len(a[1])) or function(*a))
    assert index_of(run, photos, '--batch_size', '3').returncode == 0
    assert calls == [3, 3, 3, 3, 1]  # the files after the stop, in the batches of one pass
    one_pass = tmp_path / 'one_pass'
    assert index_of(run, photos, '--batch_size', '3', '--results_dir', one_pass).returncode == 0
    assert_same_index(path, one_pass / path.name)


KILL_AT_SECOND_PART = '''
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import run_files
save, calls = run_files.save_together, []
def killed(writers):
    calls.append(1)
    if len(calls) == 2:  # the second part: its temporary written, killed before the rename
        save({{path: lambda tmp, w=write: (w(tmp), os.kill(os.getpid(), signal.SIGKILL))
              for path, write in writers.items()}})
    save(writers)
run_files.save_together = killed
sys.argv = ['index.py', *sys.argv[1:]]
runpy.run_path({index!r}, run_name='__main__')
'''


@pytest.mark.slow
def test_a_killed_index_continues_to_the_one_pass_index(run, photos, tmp_path):
    flags = [str(run / f'{prefix()}_model.pth'), '--images', str(photos), '--num_workers', '0', '--batch_size', '2']
    script = KILL_AT_SECOND_PART.format(repo=REPO, index=os.path.join(REPO, 'index.py'))
    killed = subprocess.run([sys.executable, '-c', script, *flags], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    path = run / f'{prefix()}_photos_index.pth'
    parts = folder_index.parts_folder(str(path))
    names = sorted(os.listdir(parts))
    assert len(names) == 2 and names[1] == 'part-000001.pth' and names[0].startswith('.part-000002.pth.')
    result = run_main('index', *flags)
    assert result.returncode == 0, result.stderr
    assert 'embedded 12 files' in result.stdout  # 28 less the 16 of the part that was written
    assert not os.path.exists(parts)
    one_pass = tmp_path / 'one_pass'
    assert run_main('index', *flags, '--results_dir', one_pass).returncode == 0
    assert_same_index(path, one_pass / path.name)


@pytest.mark.slow
def test_update_embeds_the_files_added_and_changed_and_drops_the_removed(run, photos, tmp_path):
    """Batches of one image (an embedding then does not depend on its batch): the updated index equals one pass."""
    assert index_of(run, photos, '--batch_size', '1').returncode == 0
    shutil.rmtree(photos / 'train_class_03')
    write_image(str(photos / 'new' / 'a.jpg'), seed=3)
    write_image(str(photos / 'test_class_00' / 'b.jpg'), seed=4)
    write_image(str(photos / 'test_class_01' / '0.jpg'), size=(30, 30), seed=5)  # changed in place
    refused = index_of(run, photos, '--batch_size', '1')
    assert_one_line_error(refused, 2, 'exists: pass --update')
    result = index_of(run, photos, '--batch_size', '1', '--update')
    assert result.returncode == 0, result.stderr
    assert '26 images' in result.stdout
    assert 'embedded 3 files added or changed since the index of 28 images, 4 removed' in result.stdout
    path = run / f'{prefix()}_photos_index.pth'
    assert not any('train_class_03' in p for p in stored(path)['test_images'])
    again = index_of(run, photos, '--batch_size', '1', '--update')
    assert 'embedded 0 files' in again.stdout
    one_pass = tmp_path / 'one_pass'
    assert index_of(run, photos, '--batch_size', '1', '--results_dir', one_pass).returncode == 0
    assert_same_index(path, one_pass / path.name)


@pytest.mark.slow
def test_an_update_by_another_model_embeds_everything_and_another_folder_is_refused(run, photos, tmp_path):
    assert index_of(run, photos).returncode == 0
    weights = torch.load(run / f'{prefix()}_model.pth', weights_only=True)
    next(iter(weights.values())).add_(0.5)
    torch.save(weights, run / f'{prefix()}_model.pth')
    result = index_of(run, photos, '--update')
    assert result.returncode == 0 and 'embedded 28 files' in result.stdout, result.stderr
    other = shutil.copytree(photos, tmp_path / 'elsewhere' / 'photos')
    assert_one_line_error(index_of(run, other, '--update'), 2, 'indexes', 'pass --name')
    assert index_of(run, other, '--name', 'elsewhere').returncode == 0


def test_an_index_written_into_the_folder_it_indexes_leaves_its_own_files_out(run, photos):
    flags = ['--results_dir', photos, '--batch_size', '4']
    assert index_of(run, photos, *flags, '--faiss', 'flat').returncode == 0
    result = index_of(run, photos, *flags, '--update')
    assert result.returncode == 0 and 'embedded 0 files' in result.stdout and 'unreadable' not in result.stderr
    assert len(stored(photos / f'{prefix()}_photos_index.pth')['test_images']) == 28


def test_a_folder_of_queries_gets_a_grid_each_and_one_csv(run, photos, tmp_path):
    assert index_of(run, photos, '--labels', 'folders').returncode == 0
    queries = tmp_path / 'queries'
    shutil.copytree(photos / 'test_class_00', queries / 'mine')
    shutil.copy(photos / 'test_class_01' / '1.jpg', queries / 'other.jpg')
    (queries / 'broken.jpg').write_text('no image')
    path = run / f'{prefix()}_photos_index.pth'
    result = run_main('inference', '--data_base', path, '--query_img_name', queries, '--retrieval_num', '3')
    assert result.returncode == 0, result.stderr
    assert 'left out 1 unreadable files: broken.jpg' in result.stderr
    grids = [name for name in os.listdir(run) if name.endswith(f'{prefix()}_photos_retrieval.png')]
    assert len(grids) == 5
    table = list(csv.DictReader(open(run / f'queries-{figures_digest(queries)}_{prefix()}_photos_retrieval.csv')))
    assert len(table) == 15 and [row['rank'] for row in table[:3]] == ['1', '2', '3']
    # a query outside the gallery is searched whole; the same image inside it would find itself first
    own = [row for row in table if row['query'].endswith('other.jpg')]
    ensemble_size = 2  # the embedding's squared norm: each member's part has norm 1
    assert own[0]['path'].endswith('test_class_01/1.jpg')
    assert float(own[0]['similarity']) == pytest.approx(ensemble_size, abs=4e-3)


def figures_digest(path):
    return figures.query_name(str(path)).rsplit('-', 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize('kind', faiss_search.KINDS)
def test_a_faiss_index_beside_it_is_searched_and_kept_in_step(run, photos, kind):
    result = index_of(run, photos, '--faiss', kind)
    assert result.returncode == 0, result.stderr
    assert 'Recall@1' in result.stdout and 'against the exact search (28 gallery images as queries)' in result.stdout
    path = run / f'{prefix()}_photos_index.pth'
    features = stored(path)['test_features'].float().numpy()
    assert faiss_search.read_beside(str(path), features) is not None
    query = photos / 'test_class_02' / '3.jpg'
    searched = run_main('inference', '--data_base', path, '--query_img_name', query, '--retrieval_num', '5')
    note, *searched_lines = searched.stdout.splitlines()
    assert note.startswith('searching with') and {'flat': 'IndexFlatIP', 'ivf': 'IndexIVFFlat',
                                                  'hnsw': 'IndexHNSWFlat'}[kind] in note, note
    os.rename(faiss_search.faiss_path(str(path)), str(path) + '.kept')
    exact = run_main('inference', '--data_base', path, '--query_img_name', query, '--retrieval_num', '5')
    assert searched_lines == exact.stdout.splitlines()  # 28 images: every kind finds the exact top 5
    os.rename(str(path) + '.kept', faiss_search.faiss_path(str(path)))
    write_image(str(photos / 'new' / 'a.jpg'), seed=3)
    assert index_of(run, photos, '--update').returncode == 0  # the faiss index is written again with it
    updated = stored(path)
    assert updated['index']['faiss'] == kind
    assert faiss_search.read_beside(str(path), updated['test_features'].float().numpy()).ntotal == 29


@pytest.mark.slow
def test_a_faiss_index_of_other_vectors_is_not_used(run, photos, tmp_path):
    assert index_of(run, photos, '--faiss', 'flat').returncode == 0
    path = run / f'{prefix()}_photos_index.pth'
    stale = tmp_path / 'stale.faiss'
    shutil.copy(faiss_search.faiss_path(str(path)), stale)
    write_image(str(photos / 'new' / 'a.jpg'), seed=3)
    assert index_of(run, photos, '--update').returncode == 0
    shutil.copy(stale, faiss_search.faiss_path(str(path)))
    result = run_main('inference', '--data_base', path, '--query_img_name', photos / 'new' / 'a.jpg')
    assert result.returncode == 0 and 'holds other vectors than' in result.stderr, result.stderr


@pytest.mark.slow
def test_overwrite_indexes_anew_and_drops_a_faiss_index_it_does_not_write(run, photos):
    assert index_of(run, photos, '--faiss', 'flat').returncode == 0
    path = run / f'{prefix()}_photos_index.pth'
    shutil.rmtree(photos / 'train_class_00')
    result = index_of(run, photos, '--overwrite')
    assert result.returncode == 0 and 'embedded 24 files' in result.stdout, result.stderr
    assert len(stored(path)['test_images']) == 24 and stored(path)['index']['faiss'] is None
    assert not os.path.exists(faiss_search.faiss_path(str(path)))
    assert index_of(run, photos, '--overwrite', '--update').returncode == 2


def test_without_faiss_the_flag_says_how_to_install_it(run, photos, monkeypatch):
    monkeypatch.setattr(faiss_search, 'available', lambda: False)
    assert_one_line_error(index_of(run, photos, '--faiss', 'hnsw'), 2, 'pip install faiss-cpu')
    assert not any('photos' in name for name in os.listdir(run))


def test_bad_input_is_one_line_and_writes_nothing(run, photos, tmp_path):
    before = sorted(os.listdir(run))
    empty = tmp_path / 'empty'
    (empty / '.hidden').mkdir(parents=True)
    assert_one_line_error(index_of(run, empty), 1, 'no files in it')
    texts = tmp_path / 'texts'
    texts.mkdir()
    for i in range(3):
        (texts / f'{i}.txt').write_text('words')
    assert_one_line_error(index_of(run, texts), 1, 'none of its 3 files is an image')
    assert_one_line_error(index_of(run, tmp_path / 'missing'), 1, 'no such folder')
    (photos / 'loose.jpg').write_bytes((photos / 'test_class_00' / '0.jpg').read_bytes())
    assert_one_line_error(index_of(run, photos, '--labels', 'folders'), 2, 'loose.jpg', 'lie in none')
    not_a_model = tmp_path / f'{prefix()}_model.pth'
    not_a_model.write_text('no model')
    assert_one_line_error(run_main('index', not_a_model, '--images', photos), 1, 'corrupt')
    assert_one_line_error(run_main('index', tmp_path, '--images', photos), 2, 'is a folder')
    blocked = tmp_path / 'a_file'
    blocked.write_text('')
    assert_one_line_error(index_of(run, photos, '--results_dir', blocked / 'sub'), 1, 'cannot write')
    assert run_main('index', 'x', '--images', photos, '--name', 'a/b').returncode == 2
    assert sorted(os.listdir(run)) == before and not blocked.read_text()


def test_queries_and_galleries_that_do_not_fit_are_one_line(run, photos, trained, tmp_path):
    assert index_of(run, photos).returncode == 0
    path = run / f'{prefix()}_photos_index.pth'
    text = tmp_path / 'query.txt'
    text.write_text('no image')
    assert_one_line_error(run_main('inference', '--data_base', path, '--query_img_name', text), 1, 'unreadable')
    other = tmp_path / 'other'
    other.mkdir()
    weights = torch.load(run / f'{prefix()}_model.pth', weights_only=True)
    next(iter(weights.values())).add_(1)
    torch.save(weights, other / f'{prefix()}_model.pth')
    shutil.copy(run / f'{prefix()}_args.json', other)
    result = run_main('inference', '--data_base', path, '--query_img_name', photos / 'test_class_00' / '0.jpg',
                      '--model', other / f'{prefix()}_model.pth')
    assert_one_line_error(result, 1, 'was embedded by another model than')
    assert_one_line_error(run_main('evaluate', path), 1, 'has no classes', '--labels folders')


@pytest.mark.slow
def test_two_runs_indexes_of_a_labelled_folder_are_compared_by_ablation(run, photos, tmp_path):
    assert index_of(run, photos, '--labels', 'folders').returncode == 0
    again = tmp_path / 'again'
    assert index_of(run, photos, '--labels', 'folders', '--results_dir', again).returncode == 0
    result = run_main('ablation', '--better_data_base', run / f'{prefix()}_photos_index.pth', '--worse_data_base',
                      again / f'{prefix()}_photos_index.pth', '--results_dir', tmp_path / 'out')
    assert result.returncode == 0, result.stderr
    assert 'equal for 28 (' in result.stdout


@pytest.mark.slow
def test_an_index_whose_record_does_not_fit_is_refused_by_update(run, photos):
    assert index_of(run, photos).returncode == 0
    path = run / f'{prefix()}_photos_index.pth'
    index = stored(path)
    index['index']['files'] = index['index']['files'][1:]
    torch.save(index, path)
    assert_one_line_error(index_of(run, photos, '--update'), 1, 'does not fit its embeddings', '--overwrite')
    del index['index']
    torch.save(index, path)
    assert_one_line_error(index_of(run, photos, '--update'), 1, 'not an index that index.py wrote')


def test_an_index_named_for_another_run_is_refused(run, photos, tmp_path):
    assert index_of(run, photos).returncode == 0
    path = run / f'{prefix()}_photos_index.pth'
    renamed = tmp_path / f'{prefix(E=4)}_photos_index.pth'
    shutil.copy(path, renamed)
    assert_one_line_error(run_main('evaluate', renamed), 1, 'named for another run')
    assert data_base.run_of(str(path))[0].prefix == prefix()


@pytest.mark.slow
def test_a_second_index_py_of_the_same_index_waits_for_none(run, photos):
    """Another process writing the index (holding its lock): one line, nothing written."""
    path = run / f'{prefix()}_photos_index.pth'
    hold = (f'import sys, time; sys.path.insert(0, {REPO!r}); import folder_index; '
            f'lock = folder_index.lock({str(path)!r}); print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert_one_line_error(index_of(run, photos), 1, 'another index.py is writing')
    finally:
        holder.kill()
        holder.wait()
    assert not path.exists() and not os.path.exists(folder_index.parts_folder(str(path)))
