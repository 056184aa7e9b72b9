"""What --loss names: a loss of model.LOSSES, or one of pytorch-metric-learning's as pml.<ClassName>, with the settings
it is given, as NAME or NAME:KEY=VALUE,KEY=VALUE (normsoftmax:temperature=0.1, pml.ProxyAnchorLoss:margin=0.1,alpha=32).

A loss declares its settings in model.py, as the keyword arguments of its constructor with their defaults. A choice is
checked against them, written one way only (the settings that differ from their defaults, by key: a setting given at
its default names the same run), built, and carried readably by the file prefix of the run that trains with it:

    --loss normsoftmax:temperature=0.1    ->    results/<prefix>_normsoftmax-temperature=0.1_results.csv
"""
import argparse
import inspect
import math
import re
from dataclasses import dataclass

from model import LOSSES, PML_PREFIX, MetricLearningLoss, constructor_arguments

NAME = re.compile(r'[a-z][a-z0-9]*')         # a name of model.LOSSES that a file prefix carries and gives back
KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
WORD = re.compile(r'[A-Za-z][A-Za-z0-9]*')   # a setting that is a word (PNPLoss's variant=Ds)
# how a file prefix ends with a loss: NAME, then -KEY=VALUE for each setting (run_files.RunName.PATTERN)
PREFIX_PATTERN = rf'(?:{NAME.pattern}|{re.escape(PML_PREFIX)}{WORD.pattern})(?:-{KEY.pattern}=[A-Za-z0-9.+-]+)*'
REQUIRED = inspect.Parameter.empty  # the default of a setting that has none


@dataclass(frozen=True)
class LossChoice:
    """A loss by name, with the settings given other values than their defaults: ((key, value), ...) by key."""
    name: str
    given: tuple = ()

    @classmethod
    def parse(cls, text):
        """The LossChoice that --loss text names; ValueError saying what is wrong: an unknown loss or setting, a
        value of the wrong kind, a setting given twice, a required one missing."""
        name, _, listed = (part.strip() for part in text.partition(':'))
        declared = declared_settings(name)
        given = {}
        for item in listed.split(',') if listed else []:
            key, equals, value = (part.strip() for part in item.partition('='))
            if not equals or not key:
                raise ValueError(f'{item!r} is not KEY=VALUE (--loss NAME:KEY=VALUE,KEY=VALUE)')
            if key not in declared:
                raise ValueError(f'{name} has no setting {key!r} ({settings_words(declared)})')
            if key in given:
                raise ValueError(f'{name}\'s {key} is given twice')
            given[key] = setting_value(key, value, declared[key])
        missing = [key for key, default in declared.items() if default is REQUIRED and key not in given]
        if missing:
            raise ValueError(f'{name} has no default for {", ".join(missing)}: give {missing[0]}=VALUE')
        return cls(name, tuple(sorted((key, value) for key, value in given.items() if value != declared[key])))

    @property
    def text(self):
        """The choice as --loss takes it, written one way only."""
        return self.name + (':' + ','.join(f'{key}={value_text(value)}' for key, value in self.given)
                            if self.given else '')

    def settings(self):
        """Every setting of the loss, by key: its default, or the value given."""
        declared = declared_settings(self.name)
        return {**{key: default for key, default in declared.items() if default is not REQUIRED}, **dict(self.given)}

    def build(self, ensemble_size, meta_class_size, num_classes):
        """The loss, an nn.Module, for E branches of M meta-classes trained on num_classes classes."""
        return loss_class(self.name)(ensemble_size, meta_class_size, num_classes, **dict(self.given))

    def classifier(self):
        """The layer every branch of a model trained with this loss ends with, (in_features, M) -> module."""
        return loss_class(self.name).classifier(self.settings())


def loss_flag(text):
    """An argparse type: the LossChoice that text names, as its text."""
    try:
        return LossChoice.parse(text).text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def loss_class(name):
    """The loss class of that name, built with (E, M, classes, **settings): model.LOSSES[name], or
    model.MetricLearningLoss over pytorch-metric-learning's loss for pml.<ClassName>; ValueError where there is none."""
    if name.startswith(PML_PREFIX):
        return MetricLearningLoss.of(name[len(PML_PREFIX):])
    if name not in LOSSES:
        raise ValueError(f'no loss {name!r} in model.LOSSES ({", ".join(LOSSES)}), nor {PML_PREFIX}<ClassName> of '
                         f'pytorch-metric-learning')
    if not NAME.fullmatch(name):
        raise ValueError(f'model.LOSSES registers {name!r}, a name a run\'s file prefix cannot carry: register it '
                         f'under lowercase letters and digits, a letter first')
    return LOSSES[name]


def declared_settings(name):
    """{key: default, or REQUIRED} of the settings of the loss of that name: the keyword arguments of its constructor
    but those a run fills in (E, M and the classes; MetricLearningLoss.SIZES) and those that are not settings
    (MetricLearningLoss.NOT_SETTINGS)."""
    cls = loss_class(name)
    if issubclass(cls, MetricLearningLoss):
        skipped = {*MetricLearningLoss.SIZES, *MetricLearningLoss.NOT_SETTINGS}
        return {key: default for key, default in constructor_arguments(cls.library_loss).items()
                if key not in skipped}
    return dict(list(constructor_arguments(cls).items())[3:])  # after (ensemble_size, meta_class_size, classes)


def settings_words(declared):
    if not declared:
        return 'it has none'
    return 'its settings: ' + ', '.join(key if default is REQUIRED else f'{key}={value_text(default)}'
                                        for key, default in declared.items())


def setting_value(key, text, default):
    """The value of a setting given as text, of the kind of its default: true or false for a switch, a number for a
    number (a float where the default is one), a word or an integer for a word, any of them where the default is
    None or there is none."""
    value = parsed_value(key, text)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f'{key}={text}: {key} is true or false')
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, (bool, str)):
            raise ValueError(f'{key}={text}: {key} is a number')
        return float(value) if isinstance(default, float) else value
    if isinstance(default, str) and isinstance(value, (bool, float)):
        raise ValueError(f'{key}={text}: {key} is a word or an integer')
    return value


def parsed_value(key, text):
    if text in ('true', 'false'):
        return text == 'true'
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            raise ValueError(f'{key}={text}: not a finite number')
        return value
    if not WORD.fullmatch(text):
        raise ValueError(f'{key}={text!r}: a setting is a number, true or false, or a word of letters and digits')
    return text


def value_text(value):
    """A setting's value as --loss and a file prefix write it."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return repr(value) if isinstance(value, float) else str(value)


def prefix_part(text):
    """The end of a run's file prefix that names the loss of --loss text: NAME-KEY=VALUE-KEY=VALUE."""
    return text.replace(':', '-').replace(',', '-')


def text_of_prefix_part(part):
    """The --loss text of a file prefix's end (prefix_part's inverse; a value never holds -KEY=)."""
    name, *settings = re.split(rf'-(?={KEY.pattern}=)', part)
    return name + (':' + ','.join(settings) if settings else '')
