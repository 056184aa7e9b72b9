import os

import pandas as pd
import pytest
import torch

import data_utils
import train
import utils
from conftest import TINY, assert_one_line_error, make_folder_dataset, prefix, run_script, run_train

def test_end_to_end(tiny):
    result = run_train(tiny)
    assert result.returncode == 0, result.stderr
    assert 'Epoch 2/2' in result.stdout and 'R@1' in result.stdout
    assert 'branch engine: loop (--branch_impl auto on the CPU' in result.stdout
    results = tiny / 'results'
    frame = pd.read_csv(results / f'{prefix()}_results.csv')
    assert list(frame.columns) == ['epoch', 'train_loss', 'train_accuracy', 'test_recall@1', 'test_recall@2',
                                   'test_recall@4', 'test_recall@8', 'test_map@r', 'test_r_precision']
    assert frame['epoch'].tolist() == [1, 2]
    assert frame.drop(columns='epoch').apply(lambda c: c.between(0, 100)).all().all()

    for name in os.listdir(results):
        if name.endswith('.pth'):
            torch.load(results / name, weights_only=True)
    database = torch.load(results / f'{prefix()}_data_base.pth', weights_only=True)
    assert database['test_features'].dtype == torch.float16
    assert database['test_features'].shape == (12, 2 * 2) and database['train_features'].shape == (16, 4)
    assert len(database['test_images']) == len(database['test_labels']) == 12
    assert all(os.path.isfile(p) for p in database['train_images'] + database['test_images'])
    assert database['test_images'][0].startswith(str(tiny / 'data' / 'tiny'))

    checkpoint = torch.load(results / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 3 and len(checkpoint['results']) == 2
    assert checkpoint['args']['seed'] == 1 and len(checkpoint['train_items']) == 16
    ids = torch.load(results / 'tiny_uncropped_fixed_2_2_ids.pth', weights_only=True)
    assert ids.shape == (2, 4) and torch.equal(ids, checkpoint['ids'])
    state = torch.load(results / f'{prefix()}_model.pth', weights_only=True)
    model = train.Model(2, 2, pretrained=False)
    model.load_state_dict(state)


def test_load_ids_reuses_the_saved_ids(tiny):
    assert run_train(tiny).returncode == 0
    ids_file = tiny / 'results' / 'tiny_uncropped_fixed_2_2_ids.pth'
    first = torch.load(ids_file, weights_only=True)
    result = run_train(tiny, '--load_ids', '--seed', '5', '--num_epochs', '1')
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tiny / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert torch.equal(checkpoint['ids'], first)
    assert torch.equal(torch.load(ids_file, weights_only=True), first)


def test_query_gallery_dataset_end_to_end(tmp_path):
    make_folder_dataset(str(tmp_path / 'data' / 'shop'), {'train': 3, 'query': 2, 'gallery': 2})
    data_utils.prepare(str(tmp_path / 'data'), 'shop', num_workers=1)
    result = run_train(tmp_path, '--num_epochs', '1', '--recalls', '1,10', name='shop')
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / 'results' / f'{prefix("shop")}_results.csv')
    assert list(frame.columns)[3:] == ['test_recall@1', 'test_recall@10', 'test_map@r', 'test_r_precision']
    assert frame['test_recall@10'].iloc[0] == 100.0  # every query has a same-class item among 8 gallery images
    database = torch.load(tmp_path / 'results' / f'{prefix("shop")}_data_base.pth', weights_only=True)
    assert set(database) == {f'{s}_{k}' for s in ('query', 'gallery') for k in ('images', 'labels', 'features')}


def test_training_learns_on_an_easy_dataset(tmp_path):
    """Colour-coded classes: a few epochs must lower the loss and raise training accuracy."""
    make_folder_dataset(str(tmp_path / 'data' / 'easy'), {'train': 6, 'test': 3}, images_per_class=6)
    data_utils.prepare(str(tmp_path / 'data'), 'easy', num_workers=1)
    result = run_train(tmp_path, '--num_epochs', '4', '--meta_class_size', '3', name='easy')
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / 'results' / f'{prefix("easy", M=3)}_results.csv')
    assert frame['train_loss'].iloc[-1] < frame['train_loss'].iloc[0]


def test_unreadable_training_image_is_skipped(tiny):
    victim = tiny / 'data' / 'tiny' / 'train' / 'class_01' / '2.jpg'
    victim.write_bytes(b'not a jpeg any more')
    result = run_train(tiny, '--num_epochs', '1')
    assert result.returncode == 0, result.stderr
    assert f'skipping unreadable training image {victim}' in result.stderr
    assert '1 unreadable images skipped' in result.stdout


def test_demo_is_prepared_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_utils, 'DEMO_CLASSES', 4)
    monkeypatch.setattr(data_utils, 'DEMO_IMAGES_PER_CLASS', 2)
    args = train.get_args_parser().parse_args(['--data_path', str(tmp_path / 'data'), '--data_name', 'demo'])
    dicts = train.load_data_dicts(args)
    assert len(dicts['train']) == 2 and len(dicts['test']) == 2


# ----------------------------------------------------------------------------- devices

def test_cpu_fallback_and_missing_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert train.select_devices(None) == (torch.device('cpu'), [])
    assert train.select_devices('cpu') == (torch.device('cpu'), [])
    with pytest.raises(utils.ReirError, match='GPU 3 is not there'):
        train.select_devices('3')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert train.select_devices(None) == (torch.device('cuda:0'), [0])  # default 0,1 with one GPU
    with pytest.raises(utils.ReirError, match='GPU 1 is not there'):
        train.select_devices('0,1')


# ----------------------------------------------------------------------------- bad input

def test_missing_dataset_says_to_run_data_utils(tmp_path):
    (tmp_path / 'data').mkdir()
    assert_one_line_error(run_train(tmp_path, name='cub'), 1, 'data_utils.py', 'cub')


@pytest.mark.parametrize('flags, fragment', [
    (['--recalls', '1,x'], 'recalls'), (['--recalls', '0,1'], 'recalls'), (['--ensemble_size', '0'], 'ensemble_size'),
    (['--batch_size', '-1'], 'batch_size'), (['--image_size', '0'], 'image_size'),
    (['--num_epochs', '0'], 'num_epochs'), (['--lr', '0'], 'lr'),
    (['--meta_class_size', '0'], 'meta_class_size'), (['--share_type', 'layer9'], 'share_type')])
def test_bad_flags_exit_2(tiny, flags, fragment):
    result = run_train(tiny, *flags)
    assert result.returncode == 2 and fragment in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.parametrize('flags, fragment', [
    (['--meta_class_size', '5'], 'larger than the number of training classes'),
    (['--meta_class_size', '2', '--ensemble_size', '1'], 'distinct codes'),
    (['--crop_type', 'cropped'], 'only car and cub')])
def test_impossible_flag_combinations_exit_2(tiny, flags, fragment):
    assert_one_line_error(run_train(tiny, *flags), 2, fragment)


def test_explicit_missing_gpu_is_an_error(tiny):
    assert_one_line_error(run_train(tiny, '--gpu_ids', '0'), 1, 'GPU 0 is not there')


def test_load_ids_without_file_or_with_wrong_shape(tiny):
    assert_one_line_error(run_train(tiny, '--load_ids'), 1, 'meta-class ids not found')
    torch.save(torch.zeros(3, 4, dtype=torch.long), tiny / 'results' / 'tiny_uncropped_fixed_2_2_ids.pth')
    assert_one_line_error(run_train(tiny, '--load_ids'), 1, 'do not fit', '(2, 4)')


def test_tampered_data_dicts_are_refused(tiny):
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {tiny / "pwned"}',))
    torch.save({'train': Payload()}, tiny / 'data' / 'tiny' / 'uncropped_data_dicts.pth')
    assert_one_line_error(run_train(tiny), 1, 'refused')
    assert not (tiny / 'pwned').exists()


# ----------------------------------------------------------------------------- resume

def test_killed_run_resumes_to_the_same_results(tiny, tmp_path_factory):
    """SIGKILL right after the first checkpoint, --resume, and the CSV equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time
    flags = ['--num_epochs', '3', '--num_workers', '1', '--with_random']
    reference = run_train(tiny, *flags)
    assert reference.returncode == 0, reference.stderr
    run_prefix = utils.run_prefix('tiny', 'uncropped', 'fixed', True, 'layer1', 'resnet18', 2, 2)
    expected = (tiny / 'results' / f'{run_prefix}_results.csv').read_text()

    killed = tmp_path_factory.mktemp('killed')
    command = [sys.executable, os.path.join(os.path.dirname(train.__file__), 'train.py'), '--data_path',
               str(tiny / 'data'), '--data_name', 'tiny', '--results_dir', str(killed), *TINY, *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / f'{run_prefix}_checkpoint.pth'
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    epochs_done = torch.load(checkpoint, weights_only=True)['epoch'] - 1
    assert epochs_done < 3, 'the run finished before it could be killed'

    resumed = run_script('train.py', '--data_path', tiny / 'data', '--data_name', 'tiny', '--results_dir', killed,
                         *TINY, *flags, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stdout
    assert (killed / f'{run_prefix}_results.csv').read_text() == expected
    assert not [name for name in os.listdir(killed) if name.endswith('.tmp')]


def test_resume_with_other_flags_is_refused(tiny):
    assert run_train(tiny, '--num_epochs', '1').returncode == 0
    result = run_train(tiny, '--num_epochs', '1', '--batch_size', '3', '--resume')
    assert_one_line_error(result, 2, '--batch_size 4 -> 3')


def test_resume_without_or_with_a_bad_checkpoint(tiny):
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'no checkpoint')
    checkpoint = tiny / 'results' / f'{prefix()}_checkpoint.pth'
    checkpoint.write_bytes(b'\x00' * 100)
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'corrupt')
    torch.save({'model': {}}, checkpoint)
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'not a REIR checkpoint')


def test_tampered_checkpoint_runs_no_code(tiny):
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {tiny / "pwned"}',))
    (tiny / 'results').mkdir()
    torch.save({'args': Payload()}, tiny / 'results' / f'{prefix()}_checkpoint.pth')
    assert_one_line_error(run_train(tiny, '--resume'), 1, 'refused')
    assert not (tiny / 'pwned').exists()


# ----------------------------------------------------------------------------- curves and torch.distributed

def test_curves_are_drawn_after_every_epoch(tiny, tmp_path):
    from PIL import Image
    assert run_train(tiny, '--num_epochs', '1').returncode == 0
    with Image.open(tiny / 'results' / f'{prefix()}_curves.png') as image:
        assert image.format == 'PNG' and image.width > 400
    rows = [{'epoch': e, 'train_loss': 2.0 / e, 'train_accuracy': 10.0 * e, 'test_recall@1': 5.0 * e,
             'test_map@r': 1.0 * e, 'test_r_precision': 2.0 * e} for e in (1, 2)]
    train.save_curves(rows[:1], str(tmp_path / 'one.png'))
    train.save_curves(rows, str(tmp_path / 'two.png'))
    assert (tmp_path / 'one.png').read_bytes() != (tmp_path / 'two.png').read_bytes()


def test_two_process_gloo_run_writes_what_one_process_writes(tiny, tmp_path_factory):
    import subprocess
    import sys
    single = run_train(tiny, '--num_epochs', '1')
    assert single.returncode == 0, single.stderr
    results = tmp_path_factory.mktemp('ddp')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               os.path.join(os.path.dirname(train.__file__), 'train.py'), '--data_path', str(tiny / 'data'),
               '--data_name', 'tiny', '--results_dir', str(results), *TINY, '--num_epochs', '1']
    distributed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert distributed.returncode == 0, distributed.stderr
    assert distributed.stdout.count('Epoch 1/1 |') == 1  # only rank 0 prints
    assert '2 processes of 2 images a step' in distributed.stdout
    assert sorted(os.listdir(results)) == sorted(os.listdir(tiny / 'results'))
    database = torch.load(results / f'{prefix()}_data_base.pth', weights_only=True)
    reference = torch.load(tiny / 'results' / f'{prefix()}_data_base.pth', weights_only=True)
    assert database['test_images'] == reference['test_images']  # shards gathered back in dataset order
    assert database['train_features'].shape == reference['train_features'].shape
    frame = pd.read_csv(results / f'{prefix()}_results.csv')
    assert len(frame) == 1 and frame['test_recall@1'].between(0, 100).all()


def test_seeded_sampler_shards_cover_every_sample():
    sampler = train.SeededSampler(10, seed=0, rank=1, num_replicas=3)
    assert len(sampler) == 4 and len(list(sampler)) == 4
    shards = [[i for i, _ in train.SeededSampler(10, 0, r, 3)] for r in range(3)]
    assert sorted(set(sum(shards, []))) == list(range(10))
    assert list(train.SeededSampler(10, 0)) == list(train.SeededSampler(10, 0))


def test_grouped_engine_run_is_evaluated_by_the_loop(tiny):
    """A run trained with --branch_impl grouped: its checkpoint has the loop's layout, and evaluate.py
    (the loop on the CPU) reproduces its recall."""
    result = run_train(tiny, '--num_epochs', '1', '--branch_impl', 'grouped', '--with_random')
    assert result.returncode == 0, result.stderr
    run_prefix = utils.run_prefix('tiny', 'uncropped', 'fixed', True, 'layer1', 'resnet18', 2, 2)
    state = torch.load(tiny / 'results' / f'{run_prefix}_model.pth', weights_only=True)
    assert list(state) == list(train.Model(2, 2, pretrained=False).state_dict())
    evaluation = run_script('evaluate.py', tiny / 'results' / f'{run_prefix}_model.pth', '--batch_size', '4',
                            '--num_workers', '0')
    assert evaluation.returncode == 0, evaluation.stderr
    trained = pd.read_csv(tiny / 'results' / f'{run_prefix}_results.csv')
    evaluated = pd.read_csv(tiny / 'results' / f'{run_prefix}_eval.csv')
    assert evaluated['test_recall@1'].iloc[0] == pytest.approx(trained['test_recall@1'].iloc[0], abs=100 / 12)
