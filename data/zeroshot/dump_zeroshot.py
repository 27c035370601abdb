#!/usr/bin/env python3
"""Regenerate the zero-shot metadata files in this folder.

Run with the fixture venv (clip_benchmark and open_clip_torch installed):

    ~/.cache/rankalign/fixture-venv/bin/python data/zeroshot/dump_zeroshot.py

Nothing is downloaded and neither torch nor torchvision is imported: the JSON
files and builder.py are read straight out of the installed clip_benchmark
package (or out of a clip_benchmark wheel given with --wheel), and open_clip's
zero_shot_metadata.py is loaded by file path for the ImageNet cross-check.
The output is deterministic; running it again rewrites the same bytes.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))

# CLIP_benchmark has no CIFAR class names of its own: builder.py takes them
# from torchvision's CIFAR10/CIFAR100 `.classes`, which torchvision reads from
# the dataset's own meta file (batches.meta `label_names`, meta
# `fine_label_names`). Those files come only with the dataset download, so the
# lists are written out here in the meta files' order (CIFAR-100's fine labels
# are alphabetical, with underscores, e.g. "aquarium_fish"). OpenAI's
# CLIP/data/prompts.md has the same lists with spaces instead of underscores.
# Pass --cifar-root DIR (holding cifar-10-batches-py/ and/or cifar-100-python/)
# to check them against real meta files.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel",
    "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse",
    "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip",
    "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


def read_package_files(wheel):
    """Return (version, {relative name: text}) for the files we need."""
    names = [
        "datasets/en_classnames.json",
        "datasets/en_zeroshot_classification_templates.json",
        "datasets/builder.py",
    ]
    if wheel:
        with zipfile.ZipFile(wheel) as zf:
            files = {n: zf.read("clip_benchmark/" + n).decode("utf-8") for n in names}
        version = os.path.basename(wheel).split("-")[1]
        return version, files
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None:
        sys.exit("clip_benchmark is not installed; pass --wheel PATH")
    root = list(spec.submodule_search_locations)[0]
    files = {}
    for n in names:
        with open(os.path.join(root, n), encoding="utf-8") as f:
            files[n] = f.read()
    return importlib.metadata.version("clip_benchmark"), files


def literal_assignments(source, wanted):
    """Find `name = <literal>` anywhere in builder.py for each wanted name."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in wanted:
                assert target.id not in found, f"{target.id} assigned twice"
                found[target.id] = ast.literal_eval(node.value)
    missing = set(wanted) - set(found)
    assert not missing, f"not found in builder.py: {sorted(missing)}"
    return found


def load_open_clip_metadata():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None, None
    path = os.path.join(list(spec.submodule_search_locations)[0], "zero_shot_metadata.py")
    mod_spec = importlib.util.spec_from_file_location("_oc_zero_shot_metadata", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return importlib.metadata.version("open_clip_torch"), mod


def load_timm_info():
    """timm ships the ImageNet-1k synsets and the R/A index lists as text."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None, None
    info = os.path.join(list(spec.submodule_search_locations)[0], "data", "_info")
    out = {}
    for name in ["imagenet_synsets", "imagenet_r_indices", "imagenet_a_indices"]:
        with open(os.path.join(info, name + ".txt"), encoding="utf-8") as f:
            out[name] = [line.strip() for line in f if line.strip()]
    return importlib.metadata.version("timm"), out


def check_cifar_meta(root):
    import pickle

    for rel, key, expected in [
        ("cifar-10-batches-py/batches.meta", "label_names", CIFAR10_CLASSES),
        ("cifar-100-python/meta", "fine_label_names", CIFAR100_CLASSES),
    ]:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            print(f"cifar check: {path} not found, skipped")
            continue
        with open(path, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        assert meta[key] == expected, f"{path}: {key} differs from the built-in list"
        print(f"cifar check: {path} matches")


def write_lines(name, lines):
    for line in lines:
        assert isinstance(line, str) and line == line.strip() and line, repr(line)
        assert "\n" not in line and "\r" not in line, repr(line)
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"wrote {name}: {len(lines)} lines")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="read clip_benchmark's files from this wheel instead")
    ap.add_argument("--cifar-root", help="check the CIFAR lists against real meta files here")
    args = ap.parse_args()

    cb_version, files = read_package_files(args.wheel)
    classnames = json.loads(files["datasets/en_classnames.json"])
    templates = json.loads(files["datasets/en_zeroshot_classification_templates.json"])
    print(f"clip_benchmark {cb_version}")

    # ImageNet-1k: classnames and templates straight from the packaged JSON.
    in1k_names = classnames["imagenet1k"]
    in1k_templates = templates["imagenet1k"]
    assert len(in1k_names) == 1000 and len(in1k_templates) == 80

    # Cross-check against open_clip (templates there are lambdas).
    oc_version, oc = load_open_clip_metadata()
    if oc is None:
        print("open_clip not installed: ImageNet cross-check skipped")
    else:
        oc_names = list(oc.IMAGENET_CLASSNAMES)
        oc_templates = [t("{c}") for t in oc.OPENAI_IMAGENET_TEMPLATES]
        name_diff = [(i, a, b) for i, (a, b) in enumerate(zip(in1k_names, oc_names)) if a != b]
        tmpl_diff = [(i, a, b) for i, (a, b) in enumerate(zip(in1k_templates, oc_templates)) if a != b]
        assert len(oc_names) == 1000 and len(oc_templates) == 80
        assert not name_diff, f"imagenet1k classnames differ from open_clip: {name_diff}"
        assert not tmpl_diff, f"imagenet1k templates differ from open_clip: {tmpl_diff}"
        print(f"open_clip_torch {oc_version}: imagenet1k classnames and templates identical")

    # CIFAR: names as torchvision gives them; templates from the packaged JSON.
    assert len(CIFAR10_CLASSES) == 10 and len(set(CIFAR10_CLASSES)) == 10
    assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(set(CIFAR100_CLASSES))
    if args.cifar_root:
        check_cifar_meta(args.cifar_root)
    assert len(templates["cifar10"]) == 18 and len(templates["cifar100"]) == 18

    # ImageNet-R / ImageNet-A: builder.py keeps the subsets' WordNet ids and
    # masks the 1000 sorted ImageNet-1k ids with them; the classnames are the
    # masked imagenet1k names, and as neither has an entry in the template
    # JSON, build_dataset falls back to imagenet1k's templates.
    wn = literal_assignments(
        files["datasets/builder.py"],
        {"all_imagenet_wordnet_ids", "imagenet_r_wnids", "imagenet_a_wnids"},
    )
    all_wnids = wn["all_imagenet_wordnet_ids"]
    assert len(all_wnids) == 1000 and all_wnids == sorted(set(all_wnids))
    subsets = {}
    for name, key in [("imagenet-r", "imagenet_r_wnids"), ("imagenet-a", "imagenet_a_wnids")]:
        wnids = set(wn[key])
        assert len(wnids) == 200 and wnids <= set(all_wnids), name
        assert name not in templates and name not in classnames, name
        subsets[name] = [i for i, w in enumerate(all_wnids) if w in wnids]

    # Independent cross-check of the subsets against timm's packaged lists.
    timm_version, timm_info = load_timm_info()
    if timm_info is None:
        print("timm not installed: ImageNet-R/A cross-check skipped")
    else:
        assert timm_info["imagenet_synsets"] == all_wnids, "timm synsets differ"
        for name, key in [("imagenet-r", "imagenet_r_indices"), ("imagenet-a", "imagenet_a_indices")]:
            assert sorted(int(i) for i in timm_info[key]) == subsets[name], f"{name} differs from timm"
        print(f"timm {timm_version}: ImageNet-1k synsets and ImageNet-R/A indices identical")

    write_lines("imagenet1k_classnames.txt", in1k_names)
    write_lines("imagenet1k_templates.txt", in1k_templates)
    write_lines("cifar10_classnames.txt", CIFAR10_CLASSES)
    write_lines("cifar10_templates.txt", templates["cifar10"])
    write_lines("cifar100_classnames.txt", CIFAR100_CLASSES)
    write_lines("cifar100_templates.txt", templates["cifar100"])
    for name, idx in subsets.items():
        write_lines(f"{name}_classnames.txt", [in1k_names[i] for i in idx])
        write_lines(f"{name}_templates.txt", in1k_templates)
        write_lines(f"{name}_subset.txt", [str(i) for i in idx])


if __name__ == "__main__":
    main()
