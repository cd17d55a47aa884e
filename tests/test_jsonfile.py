"""JSON files from users' folders: errors name the file and say what was expected."""

import pytest

from mistral_train.jsonfile import read_json_object


def test_an_object_is_returned(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64, "name": "caf\\u00e9"}', encoding="utf-8")
    assert read_json_object(path) == {"hidden_size": 64, "name": "café"}


@pytest.mark.parametrize("text, message", [("{'single': 'quotes'}", r"config\.json: not valid JSON"),
                                           ("[1, 2]", r"config\.json: expected a JSON object, got list"),
                                           (b"\xff\xfe{}", r"config\.json: not valid JSON")])
def test_bad_files_name_the_file_and_what_was_expected(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        read_json_object(path)


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "absent.json")
