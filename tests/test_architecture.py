from PIL import Image

import architecture
from conftest import run_main


def test_the_figure_describes_the_model_code():
    parts = architecture.describe('resnet18', 'layer1', 4, 12, 256)
    assert parts['stem'] == ['conv1', 'bn1', 'relu', 'maxpool', 'layer1']
    assert parts['branch'] == ['layer2', 'layer3', 'layer4']
    assert parts['shared_shape'] == (64, 64, 64) and parts['feature_shape'] == (512, 8, 8)
    parts = architecture.describe('resnet50', 'none', 3, 4, 64)
    assert parts['stem'] == [] and parts['branch'][0] == 'conv1' and parts['feature_shape'] == (2048, 2, 2)


def test_the_figure_is_drawn(tmp_path):
    output = tmp_path / 'architecture.png'
    result = run_main('architecture', '--ensemble_size', '5', '--with_random', '--output', output)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == 'PNG' and image.width > 800
