"""The benchmark's own cases, at toy sizes: each measures what it says and reports the same metrics as the code
it compares with."""
import os

import numpy as np
import pytest
import torch

import benchmark
import run_files
import utils
from conftest import scalar_points


class Queue(list):
    put = list.append


def test_branch_cases_time_every_engine_and_phase():
    config = dict(device='cpu', share_type='layer4', batch_size=2, amp=False, model_type='resnet18', ensemble_size=2,
                  image_size=32, steps=1, rounds=1)
    queue = Queue()
    benchmark.branches_speed(config, queue)
    seconds, auto_engine = queue[0]
    assert auto_engine == 'loop' and set(seconds) == {(p, i) for p in ('train', 'eval')
                                                      for i in ('loop', 'grouped', 'auto')}
    assert all(0 < value < 60 for value in seconds.values())
    benchmark.branches_memory(config, 'grouped', 'train', queue)
    assert queue[1] >= 0


def test_training_step_is_the_one_train_py_runs():
    config = dict(device='cpu', share_type='layer3', batch_size=2, amp=False, model_type='resnet18', ensemble_size=2,
                  image_size=32)
    model, batch = benchmark.branch_setup(config)
    before = [p.clone() for p in model.parameters()]
    benchmark.time_steps(model, 'train', batch, 0, amp=False)  # the warm-up step only
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_eval_case_reports_the_project_metrics():
    queue = Queue()
    benchmark.eval_case('reir', 600, 16, 'float32', 0, queue)
    row = queue[0]
    vectors, labels = benchmark.clustered_embeddings(600, 16, max(2, 600 * benchmark.SOP_TEST_CLASSES //
                                                                   benchmark.SOP_TEST_IMAGES), 0, torch.float32)
    recalls, map_r, _ = utils.retrieval_metrics(vectors, labels, benchmark.EVAL_RANKS)
    assert row['recall@1'] == pytest.approx(100 * recalls[0], abs=1e-3)
    assert row['map@r'] == pytest.approx(100 * map_r, abs=1e-3)


def test_photos_are_deterministic_and_sized(tmp_path):
    first = benchmark.photo(str(tmp_path / 'a.jpg'), 320, 240, np.random.default_rng(3))
    second = benchmark.photo(str(tmp_path / 'b.jpg'), 320, 240, np.random.default_rng(3))
    assert open(first, 'rb').read() == open(second, 'rb').read()
    assert utils.load_rgb(first).size == (320, 240)


def test_checkpoint_case_writes_what_train_py_writes(tmp_path, monkeypatch):
    written = []
    checkpoint_file = run_files.RunState.checkpoint_file
    monkeypatch.setattr(run_files.RunState, 'checkpoint_file',
                        lambda state, trainable, **position: written.append((state, trainable))
                        or checkpoint_file(state, trainable, **position))
    config = dict(device='cpu', share_type='layer4', batch_size=2, amp=False, model_type='resnet18', ensemble_size=2,
                  image_size=32, rounds=1)
    queue = Queue()
    benchmark.checkpoint_case(config, str(tmp_path), queue)
    row = queue[0]
    state, trainable = written[0]
    assert set(trainable) == set(run_files.TRAINABLE_FORMAT) and isinstance(state, run_files.RunState)
    assert optimizer_moments(trainable['optimizer'])  # after a step, as in a run
    assert 40 < row['size_mib'] < 200 and all(row[key] > 0 for key in ('atomic_s', 'plain_s', 'step_s'))
    assert os.listdir(tmp_path) == []


def optimizer_moments(optimizer):
    return [state['exp_avg'] for state in optimizer.state_dict()['state'].values()]


@pytest.mark.slow
def test_the_step_profile_times_every_phase_of_train_py_s_step(tmp_path, monkeypatch):
    """benchmark.py step on a toy model: the phases of engine.train_step (the step train.py runs) timed, operations
    counted, the checkpoint written as train.py writes it with steps run while it is written, and the embedding
    timed at both batch sizes."""
    steps = []
    forward_backward = benchmark.engine.forward_backward
    monkeypatch.setattr(benchmark.engine, 'forward_backward', lambda *args: steps.append(1) or forward_backward(*args))
    config = dict(device='cpu', model_type='resnet18', share_type='layer4', ensemble_size=2, meta_class_size=3,
                  image_size=32, batch_size=4, eval_batch_size=8, steps=2, amp=False, compile=False,
                  branch_impl='auto', num_workers=0)
    queue = Queue()
    benchmark.step_profile(config, str(tmp_path), queue)
    row = queue[0]
    assert set(row) == set(benchmark.STEP_COLUMNS) - set(config)
    assert len(steps) >= 2 + 2 + 2 + 1 + 1  # warm-up, timed, profiled by phase, by operation, during the write
    assert all(row[key] > 0 for key in ('step_ms', 'forward_backward_ms', 'optimizer_ms', 'checkpoint_mib',
                                        'checkpoint_write_s', 'embed_images_per_s_train_batch',
                                        'embed_images_per_s_eval_batch'))
    assert row['ops_per_step'] > 100 and row['kernels_per_step'] is None and row['gpu_idle_pct'] is None
    # the log's cost: its steps written, LOG_ROUNDS blocks of 2 (each numbered as the first epoch's)
    assert row['step_ms_with_log'] > 0 and row['step_ms_without_log'] > 0
    logged = [step for tag, step, _ in scalar_points(tmp_path / 'tensorboard') if tag == 'train/loss']
    assert sorted(logged) == sorted([1, 2] * benchmark.LOG_ROUNDS)
    before, now = benchmark.epoch_budget(row, config, 'cub')
    assert before['training'] == now['training'] and now['database'] == 0 < before['database']
    assert not [name for name in os.listdir(tmp_path) if name.endswith('.tmp')]


@pytest.mark.slow
def test_index_cases_embed_the_folder_both_ways_and_measure_faiss_against_the_exact_search(tmp_path):
    config = dict(share_type='layer4', ensemble_size=2, meta_class_size=2, image_size=32, batch_size=4, num_workers=0)
    root = tmp_path / 'photos'
    for i in range(6):
        benchmark.photo(str(root / f'class_{i % 2}' / f'{i}.jpg'), 60, 40, np.random.default_rng(i))
    model_path = benchmark.demo_run(str(tmp_path / 'run'), config)
    assert benchmark.evaluation_pipeline_seconds(model_path, str(root), config) > 0
    assert benchmark.index_seconds(model_path, str(root), config, str(tmp_path / 'out')) > 0
    index = torch.load(next((tmp_path / 'out').glob('*_photos_index.pth')), weights_only=True)
    assert index['test_features'].shape == (6, 4)
    queue = Queue()
    benchmark.faiss_case('exact', 3000, 0, 'clustered', queue)
    benchmark.faiss_case('hnsw', 3000, 0, 'low_rank', queue)
    exact, hnsw = queue[0], queue[1]
    assert len(exact) == 1 and exact[0]['recall@10'] == 100.0 and exact[0]['query_ms'] > 0
    assert [row['search_effort'] for row in hnsw] == list(benchmark.SEARCH_EFFORTS['hnsw'])
    assert all(0 < row['recall@10'] <= 100 for row in hnsw) and hnsw[-1]['recall@10'] >= hnsw[0]['recall@10']
