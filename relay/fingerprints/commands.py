"""`isdr fingerprint convert` and `isdr fingerprint check`.

`add_parser(subparsers)` registers the `fingerprint` command on the `isdr` command line; every
sub-command sets `func`, a callable(args) -> exit code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from relay.fingerprints.loader import LoadProblem, fingerprint_files, load_fingerprint_files, load_seed_file
from relay.fingerprints.manifest import DNS_LABEL_MAX, is_dns_label, manifest_yaml

EXIT_OK = 0
EXIT_PROBLEMS = 1  # check: some fingerprint is broken
EXIT_UNUSABLE = 2  # convert: the input cannot be converted (or bad arguments)

FINGERPRINT_HELP = "Check fingerprint files, and convert the original relay's JSON fingerprints."

FINGERPRINT_EPILOG = """\
examples:
  isdr fingerprint check /etc/isdr/fingerprints
  isdr fingerprint convert fingerprints/cns_t1_oars.json > fingerprints/cns-t1-oars.yaml
  isdr fingerprint test ./ct-series/ --fingerprints /etc/isdr/fingerprints

Reference: docs/fingerprints.md"""

CONVERT_DESCRIPTION = """\
Print the Fingerprint manifest (YAML) equivalent to an original relay fingerprint JSON file.

The manifest speaks protocol v1 (the JSON file's inference_server_url is the v1 tasks URL), and
its destinations are the file's scus. Its name is the file name made a valid Kubernetes name,
unless --name is given. Save the output next to the JSON file (and remove the JSON file), or
apply it to a cluster with kubectl.

A problem in the file (invalid JSON, a # comment, a missing field, an invalid regular
expression, ...) is printed on stderr as FILE:LINE:COLUMN: message, and the exit code is 2."""

CONVERT_EPILOG = """\
examples:
  isdr fingerprint convert fingerprints/cns_t1_oars.json > fingerprints/cns-t1-oars.yaml
  isdr fingerprint convert cns_t1_oars.json --name brain-oars | kubectl apply -f -"""

CHECK_DESCRIPTION = """\
Validate fingerprint files without starting the relay: original relay JSON files (*.json) and
Fingerprint manifests (*.yaml, *.yml). A folder is checked the way the relay reads
FINGERPRINT_DIR: its *.json, *.yaml and *.yml files, other files are ignored.

Prints one line per usable fingerprint ("ok   NAME  (FILE)") and one line per problem
("FILE:LINE:COLUMN: message"). Exit code 0 when there is no problem (warnings allowed), 1
otherwise."""

CHECK_EPILOG = """\
examples:
  isdr fingerprint check /etc/isdr/fingerprints
  isdr fingerprint check cns_t1_oars.json ct-thorax.yaml"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fingerprint` with its sub-commands `convert` and `check`."""
    parser = subparsers.add_parser(
        "fingerprint",
        help="check fingerprint files, test which ones a DICOM series matches, convert the original relay's JSON fingerprints",
        description=FINGERPRINT_HELP,
        epilog=FINGERPRINT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="fingerprint_command", metavar="COMMAND", required=True)

    convert_parser = commands.add_parser(
        "convert",
        help="print the Fingerprint manifest equivalent to an original relay JSON file",
        description=CONVERT_DESCRIPTION,
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert_parser.add_argument("file", metavar="FILE.json", type=Path, help="an original relay fingerprint file")
    convert_parser.add_argument(
        "--name",
        help=f"the manifest's metadata.name (lower-case letters, digits, '-'; at most {DNS_LABEL_MAX} characters); "
        "default: made from the file name",
    )
    convert_parser.set_defaults(func=convert)

    check_parser = commands.add_parser(
        "check",
        help="validate fingerprint files or folders",
        description=CHECK_DESCRIPTION,
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check_parser.add_argument("paths", metavar="DIR_OR_FILE", type=Path, nargs="+", help="a fingerprint folder or file")
    check_parser.set_defaults(func=check)
    _add_test(commands)
    return parser


TEST_DESCRIPTION = """\
Dry run: which fingerprints a DICOM file or series would be sent to, and for each that it would
not, which rule failed (an expression not found in its attribute, the exclude expression found,
an expression that cannot be evaluated, a Fingerprint the operator has not found Ready). Nothing
is sent anywhere.

FILE|DIR: DICOM files, or folders of them (walked recursively); files are grouped into series as
the relay groups them. Fingerprints come from --fingerprints DIR, by default the folder `isdr run`
reads (FINGERPRINT_DIR), or with --cluster from the cluster's Fingerprint resources.

Exit code 0 when every series matches at least one fingerprint, 1 when some series matches none,
2 when the files or fingerprints cannot be read."""

TEST_EPILOG = """\
examples:
  isdr fingerprint test ./ct-series/
  isdr fingerprint test ./ct-series/ --fingerprints ./fingerprints
  isdr fingerprint test image.dcm --cluster --namespace isdr"""


def _add_test(commands) -> None:
    parser = commands.add_parser("test", help="dry run: which fingerprints a DICOM file or series matches, and why not",
                                 description=TEST_DESCRIPTION, epilog=TEST_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", metavar="FILE|DIR", type=Path, nargs="+", help="DICOM files or folders")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--fingerprints", metavar="DIR", type=Path,
                        help="folder of fingerprint files (default: FINGERPRINT_DIR, as `isdr run`)")
    source.add_argument("--cluster", action="store_true", help="test against the Fingerprints in the cluster")
    parser.add_argument("--namespace", help="with --cluster: the namespace (default: the kubeconfig's, or default)")
    parser.add_argument("--kubeconfig", help="with --cluster: kubeconfig file (default: KUBECONFIG or ~/.kube/config)")

    def test(args: argparse.Namespace) -> int:
        # The command line's work (reading DICOM files, the cluster) lives outside this core package.
        from relay.fingerprint_dry_run import run

        return run(args)

    parser.set_defaults(func=test)


def _print_problems(problems: tuple[LoadProblem, ...] | list[LoadProblem], stream: TextIO) -> None:
    for problem in problems:
        print(problem, file=stream)


def convert(args: argparse.Namespace) -> int:
    if args.name is not None and not is_dns_label(args.name):
        print(
            f"--name {args.name!r} is not a valid name: use lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {DNS_LABEL_MAX} characters",
            file=sys.stderr,
        )
        return EXIT_UNUSABLE
    result = load_seed_file(args.file)
    _print_problems(result.problems, sys.stderr)  # warnings too: they do not stop the conversion
    if result.errors or not result.fingerprints:
        return EXIT_UNUSABLE
    fp = result.fingerprints[0]
    if args.name:
        fp = replace(fp, name=args.name)
    comment = (
        f"Converted from {args.file} by `isdr fingerprint convert`.\n"
        "Protocol v1: spec.inferenceServer.url is the v1 tasks URL."
    )
    sys.stdout.write(manifest_yaml(fp, comment))
    return EXIT_OK


def _expand(paths: list[Path]) -> tuple[list[Path], list[LoadProblem]]:
    """Folders -> their fingerprint files; a folder without any is a problem worth knowing."""
    files: list[Path] = []
    problems: list[LoadProblem] = []
    for path in paths:
        if path.is_dir():
            try:
                found = fingerprint_files(path)
            except OSError as error:
                problems.append(LoadProblem(str(path), None, None, f"cannot be read: {error.strerror}"))
                continue
            if not found:
                problems.append(
                    LoadProblem(str(path), None, None, "holds no fingerprint files (*.json, *.yaml, *.yml)")
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(LoadProblem(str(path), None, None, "does not exist"))
    return files, problems


def check(args: argparse.Namespace) -> int:
    files, problems = _expand(list(args.paths))
    result = load_fingerprint_files(files)
    problems += result.problems
    width = max((len(fp.name) for fp in result.fingerprints), default=0)
    for fp in result.fingerprints:
        print(f"ok   {fp.name:<{width}}  ({fp.source})")
    _print_problems(problems, sys.stdout)
    errors = sum(problem.severity == "error" for problem in problems)
    warnings = len(problems) - errors
    print(
        f"{len(result.fingerprints)} fingerprint(s) ok, {errors} problem(s)"
        + (f", {warnings} warning(s)" if warnings else "")
    )
    return EXIT_PROBLEMS if errors else EXIT_OK
