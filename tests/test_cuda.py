"""The CUDA tier: training and evaluation on a GPU. Run with `python -m pytest -q -m cuda` (the device-
parametrized tests of the other files join it); without CUDA every test here is skipped with the reason."""
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import engine
import train
import utils
from branch_engines import ENGINES
from conftest import CUDA, prefix, run_main, run_train
from model import Model, embed

pytestmark = CUDA


def train_in_process(tiny, *flags):
    """train.py on the tiny dataset, in this process; returns what it printed."""
    result = run_train(tiny, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_finite_results(tiny):
    frame = pd.read_csv(tiny / 'results' / f'{prefix()}_results.csv')
    assert len(frame) == 2 and frame.notna().all().all() and frame['train_loss'].between(0, 10).all()


def test_bf16_training_with_the_engine_chosen_by_a_timed_trial(tiny):
    if not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bf16')
    printed = train_in_process(tiny, '--gpu_ids', '0', '--amp')
    engine_line = next(line for line in printed.splitlines() if line.startswith('branch engine:'))
    assert 'timed on' in engine_line and 'loop' in engine_line and 'grouped' in engine_line
    assert_finite_results(tiny)
    checkpoint = torch.load(tiny / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['scaler'] == {}  # bf16 needs no loss scaling


def test_fp16_training_uses_the_gradient_scaler(tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: False)
    train_in_process(tiny, '--gpu_ids', '0', '--amp', '--branch_impl', 'grouped')
    assert_finite_results(tiny)
    checkpoint = torch.load(tiny / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['scaler']['scale'] > 0


@pytest.mark.parametrize('impl', ['loop', 'grouped'])
def test_channels_last_and_autocast_compute_the_float32_embedding(impl):
    torch.manual_seed(0)
    device = torch.device('cuda')
    net = Model(6, 4, share_type='layer1', pretrained=False).eval().to(device)
    net.branch_engine = ENGINES[impl]
    x = torch.randn(4, 3, 64, 64, device=device)
    with torch.no_grad():
        reference = embed(net(x))
        layout = engine.memory_format(device, amp=True)
        assert layout == torch.channels_last
        net = net.to(memory_format=layout)
        assert net.shared.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        channels_last = embed(net(x.contiguous(memory_format=layout)))
        with engine.autocast(device, True):
            mixed = embed(net(x.contiguous(memory_format=layout)).float())
    assert (channels_last - reference).abs().max() < 1e-4
    # every branch's unit vector within a few degrees of the float32 one
    cosines = (mixed.view(4, 4, 6) * reference.view(4, 4, 6)).sum(-1)
    assert cosines.min() > 0.99


@pytest.mark.parametrize('impl', ['loop', 'grouped'])
def test_data_parallel_over_the_gpus_present(impl):
    torch.manual_seed(0)
    gpus = list(range(torch.cuda.device_count()))
    net = Model(5, 4, share_type='layer2', with_random=True, pretrained=False).to('cuda:0')
    net.branch_engine = ENGINES[impl]
    parallel = nn.DataParallel(net, device_ids=gpus)
    x = torch.randn(2 * len(gpus), 3, 32, 32, device='cuda:0')
    with torch.no_grad():
        net.eval()
        assert (parallel(x) - net(x)).abs().max() < 1e-4
    net.train()
    logits = parallel(x)
    assert logits.shape == (len(x), 4, 5)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())


def test_evaluation_on_cuda_reproduces_the_cpu_evaluation(tiny):
    assert run_train(tiny, '--gpu_ids', 'cpu').returncode == 0  # float32 without TF32 (conftest.exact_float32)
    model_path = tiny / 'results' / f'{prefix()}_model.pth'
    on_cpu = run_main('evaluate', model_path, '--batch_size', '4', '--num_workers', '0', '--gpu_ids', 'cpu')
    cpu_metrics = pd.read_csv(tiny / 'results' / f'{prefix()}_eval.csv')
    on_gpu = run_main('evaluate', model_path, '--batch_size', '4', '--num_workers', '0', '--gpu_ids', '0')
    assert on_cpu.returncode == 0 and on_gpu.returncode == 0, on_cpu.stderr + on_gpu.stderr
    gpu_metrics = pd.read_csv(tiny / 'results' / f'{prefix()}_eval.csv')
    assert 'branch engine:' in on_gpu.stdout
    pd.testing.assert_frame_equal(gpu_metrics, cpu_metrics, atol=1e-3)


def test_retrieval_metrics_on_cuda_equal_the_cpu_ones():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=1)
    labels = torch.randint(40, (500,), generator=generator)
    on_cpu = utils.retrieval_metrics(vectors, labels, [1, 2, 4, 8, 100], chunk_size=64)
    on_gpu = utils.retrieval_metrics(vectors.cuda(), labels.cuda(), [1, 2, 4, 8, 100], chunk_size=64)
    assert on_gpu[0] == on_cpu[0]
    assert on_gpu[1:] == pytest.approx(on_cpu[1:], abs=1e-9)


def test_out_of_memory_gets_one_line_of_advice(tiny):
    # 16 images of 2048 px through 48 branches need hundreds of GiB of activations (and no tensor has
    # 2**31 elements, which some kernels refuse with another error)
    result = run_train(tiny, '--gpu_ids', '0', '--image_size', '2048', '--batch_size', '16', '--ensemble_size', '48',
                       '--num_epochs', '1')
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'error: CUDA out of memory: lower --batch_size' in result.stderr


def test_a_cuda_run_tunes_cudnn_fuses_adam_and_waits_for_the_gpu_once_an_epoch(tiny, monkeypatch):
    """cuDNN times its algorithms for the run's fixed shapes, Adam runs fused, and with the progress bar's reads out
    of the way the training loop synchronizes with the GPU only to read an epoch's sums (under
    torch.cuda.set_sync_debug_mode every synchronizing call warns)."""
    monkeypatch.setattr(train, 'SYNC_SECONDS', float('inf'))
    epoch = train.train_one_epoch
    syncs = []

    def counting(*args):
        torch.cuda.set_sync_debug_mode('warn')
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                stats = epoch(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs.append(sum('synchronizing' in str(warning.message) for warning in caught))
        return stats
    monkeypatch.setattr(train, 'train_one_epoch', counting)
    train_in_process(tiny, '--gpu_ids', '0', '--branch_impl', 'loop')
    assert torch.backends.cudnn.benchmark
    assert all(1 <= count < 4 for count in syncs), syncs  # fewer than an epoch's 4 steps: the read at its end
    checkpoint = torch.load(tiny / 'results' / f'{prefix()}_checkpoint.pth', weights_only=True)
    assert checkpoint['optimizer']['param_groups'][0]['fused'] is True
