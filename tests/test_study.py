"""study.py: a grid of real train.py processes through submitit's local executor, skipped when finished and
resumed when interrupted, summarized over seeds."""
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import data_utils
import recipes
import run_files
import study
import train
from conftest import (REPO, TINY, assert_one_line_error, file_digests, interrupt_in_epoch, run_as_command, run_main,
                      scalar_points, session_start, written_files)

ENSEMBLE = TINY.index('--ensemble_size')
# the TINY flags, the ensemble size left to the study; then 2 of the tiny dataset's 4 training classes held out
TINY_FLAGS = [*TINY[:ENSEMBLE], *TINY[ENSEMBLE + 2:], '--recalls', '1,2']
TRAIN_FLAGS = [*TINY_FLAGS, '--val_classes', '2']


def study_command(root, results, *extra, vary=('ensemble_size=2,3',), seeds='1,2', train_flags=TRAIN_FLAGS):
    own = ['--name', 'grid', *sum((['--vary', v] for v in vary), []), '--seeds', seeds, '--results_dir', results,
           *extra]
    ensemble = [] if any(v.startswith('ensemble_size=') for v in vary) else ['--ensemble_size', '2']
    return [*map(str, own), '--', '--data_path', str(root / 'data'), '--data_name', 'tiny', *train_flags, *ensemble]


def study_runs(command):
    own, passed = study.split_command_line(command)
    return study.grid(study.get_args_parser().parse_args(own), passed)[1]


def job_logs(results):
    folder = results / 'study_grid' / '.submitit'
    return {name: (folder / name).read_text() for name in os.listdir(folder) if name.endswith('_log.out')}


def selected_test_metrics(run):
    frame = pd.read_csv(run.paths['results.csv'])
    return frame.loc[frame['val_recall@1'].idxmax()]  # the first epoch of the highest validation R@1


def test_summary_statistics_against_a_hand_computation():
    mean, std, ci95 = study.summary_statistics([60.0, 70.0, 80.0])
    # std = sqrt((100 + 0 + 100) / 2) = 10; ci95 = t(0.975, 2 degrees of freedom) 4.302653 * 10 / sqrt(3)
    assert (mean, std) == (70.0, 10.0) and ci95 == pytest.approx(24.8413771, abs=1e-6)
    mean, std, ci95 = study.summary_statistics([42.0])
    assert mean == 42.0 and math.isnan(std) and math.isnan(ci95)


def test_summary_rows_group_the_seeds_of_each_configuration():
    runs = [study.Run((('ensemble_size', e),), seed, '', [], None) for e in ('1', '4') for seed in (1, 2, 3)]
    metrics = {i: {'test_recall@1': value, 'test_map@r': value / 10}
               for i, value in enumerate([10.0, 20.0, 30.0, 40.0, 50.0, 99.0])}
    del metrics[5]  # a run that failed
    selections = {i: 'val_recall@1' for i in metrics}
    rows = study.summarize(runs, metrics, selections)
    assert [(row['ensemble_size'], row['seeds']) for row in rows] == [('1', '1,2,3'), ('4', '1,2')]
    assert rows[0]['test_recall@1_mean'] == 20.0 and rows[0]['test_recall@1_std'] == 10.0
    assert rows[1]['test_map@r_mean'] == pytest.approx(4.5) and rows[1]['test_map@r_std'] == pytest.approx(
        math.sqrt(0.5))
    assert list(rows[0]) == ['ensemble_size', 'seeds', 'selected_by'] + [
        f'{m}_{s}' for m in ('test_recall@1', 'test_map@r') for s in ('mean', 'std', 'ci95')]
    assert rows[0]['selected_by'] == 'val_recall@1'
    selections[4] = 'test_recall@1'  # a configuration whose runs selected differently says both
    assert study.summarize(runs, metrics, selections)[1]['selected_by'] == 'test_recall@1,val_recall@1'


@pytest.mark.slow
def test_a_study_runs_train_processes_skips_finished_runs_and_resumes_interrupted_ones(prepared, tmp_path):
    results = tmp_path / 'results'
    command = study_command(prepared, results)
    runs = {(dict(run.config)['ensemble_size'], run.seed): run for run in study_runs(command)}
    assert sorted(runs) == [('2', 1), ('2', 2), ('3', 1), ('3', 2)]

    # (E 2, seed 2) finished and (E 2, seed 1) interrupted in epoch 2, before the study starts
    assert run_main('train', *runs['2', 2].flags).returncode == 0
    finished = written_files(results / 'study_grid' / os.path.basename(runs['2', 2].folder))
    interrupt_in_epoch(runs['2', 1].flags)

    result = run_as_command('study.py', *command)
    assert result.returncode == 0, result.stderr
    assert '4 runs (2 configurations x 2 seeds)' in result.stdout
    assert '1 finished, 1 to resume, 2 to start' in result.stdout
    assert written_files(results / 'study_grid' / os.path.basename(runs['2', 2].folder)) == finished

    logs = job_logs(results)  # one submitit job, one train.py process, for each run not finished
    assert len(logs) == 3
    resumed = [log for log in logs.values() if 'resumed from' in log]
    assert len(resumed) == 1 and 'ensemble_size=2_seed=1' in resumed[0]
    assert all('selected epoch' in log and 'Epoch 2/2' in log for log in logs.values())

    summary = pd.read_csv(results / 'study_grid.csv', dtype={'seeds': str}).set_index('ensemble_size')
    assert summary.index.tolist() == [2, 3] and summary['seeds'].tolist() == ['1,2', '1,2']
    assert summary['selected_by'].tolist() == ['val_recall@1'] * 2  # --val_classes: selected on held-out classes
    assert 'selected its epoch on the test split' not in result.stderr
    for ensemble_size in (2, 3):
        selected = [selected_test_metrics(runs[str(ensemble_size), seed]) for seed in (1, 2)]
        for metric in ('test_recall@1', 'test_map@r'):
            first, second = (s[metric] for s in selected)
            std = abs(first - second) / math.sqrt(2)  # sqrt(((a - m)^2 + (b - m)^2) / 1) with m their mean
            row = summary.loc[ensemble_size]
            assert row[f'{metric}_mean'] == pytest.approx((first + second) / 2)
            assert row[f'{metric}_std'] == pytest.approx(std)
            assert row[f'{metric}_ci95'] == pytest.approx(12.7062047 * std / math.sqrt(2))  # t(0.975, 1 d.o.f.)
    assert (results / 'study_grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for (ensemble_size, seed), run in runs.items():  # each run's log: its flags in HParams, each step once
        [log] = pathlib.Path(run.folder).glob(f'*_{run_files.RUN_LOG}')
        flags = session_start(log).hparams
        assert (flags['ensemble_size'].number_value, flags['seed'].number_value) == (int(ensemble_size), seed)
        steps = [step for tag, step, _ in scalar_points(log) if tag == 'train/loss']
        assert steps == list(range(1, len(steps) + 1))

    before = (results / 'study_grid.csv').read_bytes()
    again = run_as_command('study.py', *command)
    assert again.returncode == 0, again.stderr
    assert '4 finished, 0 to resume, 0 to start' in again.stdout
    assert len(job_logs(results)) == 3  # nothing launched
    assert (results / 'study_grid.csv').read_bytes() == before


@pytest.mark.slow
def test_sigterm_stops_the_runs_of_a_background_study_and_its_next_start_resumes_them(prepared, tmp_path):
    """A study started in the background (SIGINT ignored, as a shell without job control leaves it, so that
    submitit's cancel cannot reach the runs) and stopped with two SIGTERMs after the first epoch of its run: the
    second, which came while the study was stopping its run, left that run training on, orphaned."""
    results = tmp_path / 'results'
    command = study_command(prepared, results, vary=('ensemble_size=2',), seeds='1',
                            train_flags=[*TRAIN_FLAGS, '--num_epochs', '10'])
    run = study_runs(command)[0]
    checkpoint = run.paths['checkpoint.pth']
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'study.py'), *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # while the study stops its run: the second signal must not cut that short
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and 'interrupted: run the same command again' in stderr
    with run_files.RunLock(run.paths['lock'], run_files.RunName.from_args(run.args).prefix):
        pass  # no process holds the run any more
    assert torch.load(checkpoint, weights_only=True)['epoch'] <= 10, 'the run finished before it was stopped'

    again = run_as_command('study.py', *command)
    assert again.returncode == 0, again.stderr
    assert '0 finished, 1 to resume, 0 to start' in again.stdout
    resumed = [log for log in job_logs(results).values() if 'resumed from' in log]
    assert len(resumed) == 1 and 'Epoch 10/10' in resumed[0]


@pytest.mark.slow
def test_a_failed_run_is_named_and_the_others_are_summarized(prepared, tmp_path):
    """--val_classes 1 is refused by train.py when the run starts."""
    results = tmp_path / 'results'
    result = run_as_command('study.py', *study_command(prepared, results, vary=('val_classes=2,1',), seeds='1',
                                                        train_flags=TINY_FLAGS))
    assert result.returncode == 1
    assert 'warning: run val_classes=1_seed=1: --val_classes 1: retrieval within a single class' in result.stderr
    assert result.stderr.splitlines()[-1].startswith('error: 1 of 2 runs failed')
    summary = pd.read_csv(results / 'study_grid.csv')
    assert summary['val_classes'].tolist() == [2] and math.isnan(summary['test_recall@1_std'].item())


def test_a_missing_dataset_stops_the_study_before_any_run(tmp_path):
    result = run_as_command('study.py', *study_command(tmp_path, tmp_path / 'results'))
    assert_one_line_error(result, 1, 'uncropped_data_dicts.pth not found')
    assert not (tmp_path / 'results' / 'study_grid' / '.submitit').exists()


@pytest.mark.parametrize('vary, extra, fragment', [
    (('nosuchflag=1,2',), [], 'train.py has no flag --nosuchflag'),
    (('seed=1,2',), [], 'the study sets --seed itself'),
    (('ensemble_size=2',), ['--seed', '3'], '--seed after --: the study sets it'),
    (('ensemble_size=2',), ['--ensemble_size', '3'], '--ensemble_size is given more than once'),
    (('ensemble_size=2', 'share_type=layer2', 'ensemble_size=3'), [], '--ensemble_size is given more than once'),
    (('with_random=maybe',), [], 'a switch takes true or false'),
    (('lr=0.1,x',), [], "train.py flags: argument --lr: 'x' is not a number"),
    (('ensemble_size=3,3',), [], '--vary ensemble_size: 3 is given twice'),
    (('lr=0.1,1e-1',), [], '--vary lr: 0.1 and 1e-1 are the same value'),
    (('with_random=true,on',), [], '--vary with_random: true and on are the same value'),
    (('ensemble_size=2',), ['--seed=5'], '--seed after --: the study sets it'),
    (('ensemble_size=2',), ['--ensemble_size=3'], '--ensemble_size is given more than once'),
    (('ensemble_size=2',), ['--overw'], "--overw after --: give train.py's flags whole"),
    (('ensemble_size=2',), ['--resum'], "--resum after --: give train.py's flags whole"),
    (('ensemble_size=2',), ['--num_ep', '1'], "--num_ep after --: give train.py's flags whole"),
])
def test_flags_the_study_cannot_run_exit_2(prepared, tmp_path, vary, extra, fragment):
    result = run_as_command('study.py', *study_command(prepared, tmp_path, vary=vary), *extra)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / 'study_grid').exists()


def test_a_study_folder_of_other_flags_is_refused(prepared, tmp_path):
    command = study_command(prepared, tmp_path, vary=('ensemble_size=2',), seeds='1')
    run = study_runs(command)[0]
    assert run_main('train', *run.flags[:-4], '--num_epochs', '1', *run.flags[-4:]).returncode == 0
    assert_one_line_error(run_as_command('study.py', *command), 2, 'holds a run trained with other flags',
                          '--num_epochs 1 -> 2')


def test_switches_are_given_or_left_out():
    defaults = vars(train.get_args_parser().parse_args([]))
    assert study.run_flags((('with_random', 'true'), ('ensemble_size', '4')), 7, 'f', ['--x'], defaults) == \
        ['--x', '--with_random', '--ensemble_size', '4', '--seed', '7', '--results_dir', 'f']
    assert study.run_flags((('with_random', 'off'),), 7, 'f', [], defaults) == ['--seed', '7', '--results_dir', 'f']


@pytest.mark.slow
def test_a_run_is_judged_by_what_its_files_verifiably_hold(prepared, tmp_path):
    """Seed 1 finished, then its checkpoint was deleted (6 GB by default): finished, never trained again. Seed 2
    finished, then its results CSV was lost: resumed, which writes it again from the checkpoint. Seed 3 is damaged
    (its CSV header only, its checkpoint's args a list): named, left as it is, and the others are summarized."""
    results = tmp_path / 'results'
    command = study_command(prepared, results, vary=('ensemble_size=2',), seeds='1,2,3')
    runs = study_runs(command)
    for run in runs:
        assert run_main('train', *run.flags).returncode == 0
    os.remove(runs[0].paths['checkpoint.pth'])
    lost = runs[1].paths['results.csv']
    expected = open(lost).read()
    os.remove(lost)
    with open(runs[2].paths['results.csv'], 'w') as f:
        f.write('epoch,train_loss\n')
    checkpoint = torch.load(runs[2].paths['checkpoint.pth'], weights_only=True)
    torch.save({**checkpoint, 'args': list(checkpoint['args'])}, runs[2].paths['checkpoint.pth'])
    folders = [results / 'study_grid' / os.path.basename(run.folder) for run in runs]
    before = [file_digests(folder) for folder in folders]

    result = run_as_command('study.py', *command)
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert '1 finished, 1 to resume, 0 to start, 1 damaged;' in result.stdout
    assert (f'warning: run ensemble_size=2_seed=3 is damaged: {runs[2].paths["results.csv"]}: holds no epoch, and '
            f'no readable checkpoint continues it; left as it is') in result.stderr
    assert result.stderr.splitlines()[-1] == ('error: 1 of 3 runs failed or did not finish (above); the summary holds '
                                              'the others. Run the same command again to retry them, and '
                                              '--retrain_damaged for the damaged ones')
    assert file_digests(folders[0]) == before[0] and file_digests(folders[2]) == before[2]
    assert open(lost).read() == expected
    summary = pd.read_csv(results / 'study_grid.csv', dtype={'seeds': str})
    assert summary['seeds'].tolist() == ['1,2']


@pytest.mark.slow
def test_a_run_stopped_while_its_database_was_embedded_is_resumed(prepared, tmp_path):
    """A run stopped after its last epoch, while the selected model embedded the training images: its CSV and model
    are whole, but the study resumes it to complete its database; once its checkpoint is gone, nothing can, and the
    run counts as finished."""
    run = study_runs(study_command(prepared, tmp_path / 'results', vary=('ensemble_size=2',), seeds='1'))[0]
    assert run_main('train', *run.flags).returncode == 0
    assert study.run_state(run) == ('finished', None)
    database = torch.load(run.paths['data_base.pth'], weights_only=True)
    torch.save({key: value for key, value in database.items() if not key.startswith('train_')},
               run.paths['data_base.pth'])
    assert study.run_state(run) == ('interrupted', f'{run.paths["data_base.pth"]} lacks the training images, '
                                                   f'embedded after the last epoch')
    os.remove(run.paths['checkpoint.pth'])
    assert study.run_state(run) == ('finished', None)


@pytest.mark.slow
def test_a_finished_run_whose_best_model_is_lost_is_damaged_unless_its_checkpoint_holds_it(prepared, tmp_path):
    """The model file deleted or truncated: where the checkpoint (the end of epoch 2) holds the best epoch's weights,
    train.py --resume writes the file again, so the study resumes the run; where epoch 1 was the best, nothing can,
    and the study names the run damaged instead of resuming it for ever."""
    run = study_runs(study_command(prepared, tmp_path / 'results', vary=('ensemble_size=2',), seeds='1'))[0]
    assert run_main('train', *run.flags).returncode == 0
    checkpoint = torch.load(run.paths['checkpoint.pth'], weights_only=True)
    column = run_files.selection_column(list(checkpoint['results'][0]))
    model, whole = run.paths['model.pth'], open(run.paths['model.pth'], 'rb').read()
    for best, state in ((1, 'damaged'), (2, 'interrupted')):
        results = [dict(row, **{column: 100.0 if row['epoch'] == best else 0.0}) for row in checkpoint['results']]
        torch.save({**checkpoint, 'results': results}, run.paths['checkpoint.pth'])
        run_files.write_results_csv(results, run.paths['results.csv'])  # else the checkpoint contradicts it
        for damage in (os.remove, lambda path: open(path, 'wb').write(whole[:len(whole) // 2])):
            damage(model)
            assert study.run_state(run)[0] == state, study.run_state(run)
    result = run_main('train', *run.flags, '--resume')  # the model truncated, the checkpoint holding the best epoch
    assert result.returncode == 0, result.stderr
    assert 'writing it again from the checkpoint' in result.stderr
    restored = torch.load(model, weights_only=True)
    assert all(torch.equal(restored[name], checkpoint['model'][name]) for name in restored)
    assert study.run_state(run) == ('finished', None)


def test_each_state_tells_train_py_what_to_do():
    run = study.Run((), 1, 'f', ['--x'], train.get_args_parser().parse_args(['--gpu_ids', 'cpu']))
    assert study.job_command(run, 'interrupted', 0)[-1] == '--resume'
    assert study.job_command(run, 'new', 0)[-1] == '--x'  # nothing to replace: a start that finds files is refused
    assert study.job_command(run, 'damaged', 0)[-1] == '--overwrite'  # only with --retrain_damaged


def test_slurm_without_slurm_is_one_line(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))
    result = run_as_command('study.py', *study_command(prepared, tmp_path / 'results', '--cluster', 'slurm'))
    assert_one_line_error(result, 1, '--cluster slurm: this machine has no sbatch')
    assert not (tmp_path / 'results').exists()


# ----------------------------------------------------------------------------- the original's recipes

def readme_recipe_command():
    """The README's command that runs the original's table, as study.py's arguments."""
    lines = [line for line in open(os.path.join(REPO, 'README.md')).read().splitlines()
             if line.startswith('python study.py') and '--recipes' in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[2:]


# the tiny model for one epoch, over the recipe's own flags, keeping its E and M (whose published numbers it sets
# beside), which share_type layer4 makes 48 small heads
RECIPE_OVERRIDES = ['--no_pretrained', '--image_size', '32', '--share_type', 'layer4', '--batch_size', '4',
                    '--num_epochs', '1', '--num_workers', '0']


@pytest.fixture
def demo_as_cub(tmp_path, monkeypatch):
    """A small demo (24 classes of 4 images: 12 to train, the recipe's M) standing where CUB-200-2011 is prepared: a
    folder holding data dicts."""
    monkeypatch.setattr(data_utils, 'DEMO_CLASSES', 24)
    monkeypatch.setattr(data_utils, 'DEMO_IMAGES_PER_CLASS', 4)
    data = tmp_path / 'data'
    data_utils.prepare(str(data), 'demo', num_workers=1)
    os.rename(data / 'demo', data / 'cub')
    return data


def recipe_command(data, results):
    return [*readme_recipe_command(), '--results_dir', str(results), '--', '--data_path', str(data),
            *RECIPE_OVERRIDES]


def test_recipes_give_whole_configurations_and_a_grid_crosses_them():
    command = ['--name', 'r', '--recipes', 'sop,cub', '--vary', 'model_type=resnet18,resnet50', '--seeds', '1', '--',
               '--num_epochs', '1']
    runs = study_runs(command)
    assert [run.config for run in runs] == [(('recipe', r), ('model_type', m)) for r in ('sop', 'cub')
                                            for m in ('resnet18', 'resnet50')]
    sop = runs[1]
    assert os.path.basename(sop.folder) == 'recipe=sop_model_type=resnet50_seed=1'
    assert (sop.args.data_name, sop.args.meta_class_size, sop.args.recalls, sop.args.model_type) == \
        ('sop', 512, [1, 10, 100, 1000], 'resnet50')
    assert sop.args.num_epochs == 1  # the flags after -- override the recipe's 40
    assert recipes.published_metrics('sop', sop.args) == {
        'published_recall@1': 85.3, 'published_recall@10': 90.7, 'published_recall@100': 93.9,
        'published_recall@1000': 96.8}
    assert_one_line_error(run_as_command('study.py', '--name', 'r', '--seeds', '1'), 2, '--vary', '--recipes')
    result = run_as_command('study.py', '--name', 'r', '--recipes', 'cars', '--seeds', '1')  # argparse's own error
    assert result.returncode == 2 and "'cars': the recipes are car, car_cropped, cub" in result.stderr


@pytest.mark.slow
def test_the_readme_recipe_command_skips_absent_datasets_and_sets_the_published_numbers_beside(
        demo_as_cub, tmp_path):
    """The README's command with the tiny model over the recipes: only cub is prepared (the demo standing in for
    it), so its run goes and the five others are skipped with a line each. Its run trained beforehand, so that the
    study only summarizes: its test-selected number, the original's published one beside it, and the line that
    says it is test-selected."""
    results = tmp_path / 'results'
    command = recipe_command(demo_as_cub, results)
    own, passed = study.split_command_line(command)
    runs = study.prepared_runs(study.grid(study.get_args_parser().parse_args(own), passed)[1])
    assert [dict(run.config)['recipe'] for run in runs] == ['cub']
    assert run_main('train', *runs[0].flags).returncode == 0

    result = run_as_command('study.py', *command)
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if ' skipped: ' in line]
    assert [line.split()[2] for line in skipped] == ['car', 'car_cropped', 'cub_cropped', 'sop', 'isc']
    assert 'cropped_data_dicts.pth is not there' in skipped[2]
    assert result.stderr.splitlines()[-1] == (
        'warning: every run of study original selected its epoch on the test split (no --val_classes): those '
        'numbers are optimistic, as the original REIR\'s are; --val_classes N selects on N held-out training classes')
    summary = pd.read_csv(results / 'study_original.csv')
    row = summary.iloc[0]
    best = pd.read_csv(runs[0].paths['results.csv'])['test_recall@1'].max()
    assert (row['recipe'], row['selected_by'], row['published_recall@1'], row['published_recall@8']) == \
        ('cub', 'test_recall@1', 82.0, 95.6)
    assert row['test_recall@1_mean'] == pytest.approx(best)


def test_published_numbers_only_beside_the_configuration_they_were_published_for(capsys):
    """Another dataset, crop, E or M under a recipe's name: one warning, and no published number beside its row;
    only the K the run measured."""
    def runs_of(*train_flags):
        return study_runs(['--name', 'r', '--recipes', 'car', '--seeds', '1', '--', *train_flags])

    for flags in (['--data_name', 'mini'], ['--crop_type', 'cropped'], ['--ensemble_size', '12'],
                  ['--meta_class_size', '6']):
        runs = runs_of(*flags)
        assert recipes.published_metrics('car', runs[0].args) == {}
        study.warn_of_departures(runs + runs)
        warnings = capsys.readouterr().err.splitlines()
        assert warnings == [f'warning: recipe car (Cars196) runs with {" ".join(flags)}, not as the original '
                            f'published it: the summary leaves its published Recall@K out']
        rows = study.summarize(runs, {0: {'test_recall@1': 50.0}}, {0: 'test_recall@1'})
        assert not any(column.startswith('published_') for column in rows[0])
    measured = runs_of('--recalls', '1,2')[0].args
    assert recipes.published_metrics('car', measured) == {'published_recall@1': 93.4, 'published_recall@2': 96.6}


def test_the_printed_summary_leaves_a_single_seeds_spread_empty(capsys, tmp_path):
    args = study.get_args_parser().parse_args(['--name', 'one', '--vary', 'lr=0.1', '--seeds', '1',
                                               '--results_dir', str(tmp_path)])
    runs = study.grid(args, [])[1]
    study.write_summary(args, runs, {0: {'test_recall@1': 50.0}}, {0: 'val_recall@1'})
    printed = capsys.readouterr().out
    assert 'NaN' not in printed and '50.00' in printed


@pytest.mark.slow
def test_the_readme_recipe_command_trains_through_the_study(demo_as_cub, tmp_path):
    results = tmp_path / 'results'
    result = run_as_command('study.py', *recipe_command(demo_as_cub, results))
    assert result.returncode == 0, result.stderr
    assert '0 finished, 0 to resume, 1 to start' in result.stdout
    assert pd.read_csv(results / 'study_original.csv')['recipe'].tolist() == ['cub']


def test_the_readme_gives_the_recipes_and_published_numbers_of_recipes_py():
    """README.md teaches the recipes as train.py commands and a table; recipes.py is what study.py runs: they agree."""
    text = open(os.path.join(REPO, 'README.md')).read()
    commands = [shlex.split(line)[2:] for line in text.splitlines()
                if line.startswith('python train.py --data_name') and '--recalls' in line]
    assert commands == [list(recipe.flags) for recipe in recipes.RECIPES.values()]
    rows = {cells[1]: cells[2:] for cells in ([cell.strip() for cell in line.strip('|').split('|')]
                                              for line in text.splitlines() if line.startswith('|')) if len(cells) == 4}
    for name, recipe in recipes.RECIPES.items():
        ks, numbers = rows[f'`{name}`']
        assert [int(k) for k in ks.split(', ')] == recipe.recalls
        assert tuple(float(n) for n in numbers.split(', ')) == recipe.published['resnet18']
