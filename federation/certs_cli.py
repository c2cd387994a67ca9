"""``condi certs``: the operator's and hospitals' PKI commands on top of :mod:`federation.pki`.

Subcommands: ``init-ca``, ``request``, ``sign``, ``server``, ``dev``, ``revoke``, ``pins``. The umbrella
``condi`` CLI mounts them with :func:`add_certs_parser` and calls ``args.func(args)``; until then
``python -m federation.certs_cli <subcommand> ...`` runs them directly. Passphrases are read from
a file or an environment variable only. A failure prints one line to stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from federation import pki

EXIT_ERROR = 2
_DEFAULT_CA_DIR = "certs/ca"
_REASONS = [r.name for r in x509.ReasonFlags if r is not x509.ReasonFlags.remove_from_crl]


def _passphrase_args(parser: argparse.ArgumentParser, whose: str) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--passphrase-file", type=Path, help=f"file holding the {whose} passphrase")
    group.add_argument("--passphrase-env", metavar="VAR", help=f"environment variable holding the {whose} passphrase")


def _passphrase(args: argparse.Namespace) -> bytes | None:
    return pki.read_passphrase(file=args.passphrase_file, env=args.passphrase_env)


def _cmd_init_ca(args: argparse.Namespace) -> None:
    paths = pki.init_ca(args.out, common_name=args.cn, days=args.days, passphrase=_passphrase(args), force=args.force)
    print(f"CA certificate:  {paths.cert}  (give this to every silo and the coordinator)")
    print(f"CA key:          {paths.key}  (keep offline; never copy it to a silo)")
    print(f"revocation list: {paths.crl}")


def _cmd_request(args: argparse.Namespace) -> None:
    out = args.out if args.out is not None else Path("certs") / args.silo_id
    paths = pki.make_request(out, args.silo_id, passphrase=_passphrase(args), force=args.force)
    print(f"private key: {paths.key}  (stays at this site)")
    print(f"request:     {paths.csr}  (send this to the federation operator)")


def _cmd_sign(args: argparse.Namespace) -> None:
    out = args.out if args.out is not None else args.csr.with_suffix(".crt")
    cert = pki.sign_request(
        args.csr,
        args.ca_dir,
        out,
        days=args.days,
        ca_passphrase=_passphrase(args),
        expected_silo_id=args.silo_id,
        force=args.force,
    )
    silo_id = pki.silo_id_from_certificate(pki.load_certificate(cert))
    print(f"certificate for silo {silo_id}: {cert}  (send it back with {pki.CaPaths.in_dir(args.ca_dir).cert})")


def _cmd_server(args: argparse.Namespace) -> None:
    paths = pki.issue_server_cert(
        args.ca_dir,
        args.out,
        hostnames=args.host,
        ips=args.ip,
        days=args.days,
        ca_passphrase=_passphrase(args),
        force=args.force,
    )
    print(f"server certificate: {paths.cert}")
    print(f"server key:         {paths.key}  (stays on the coordinator host)")


def _cmd_dev(args: argparse.Namespace) -> None:
    hosts = args.host if args.host or args.ip else ["localhost"]
    ips = args.ip if args.host or args.ip else ["127.0.0.1", "::1"]
    n_silos = args.silos if args.silos is not None else (len(args.silo_id) or 3)
    result = pki.dev_pki(
        args.out,
        n_silos,
        silo_ids=args.silo_id or None,
        hostnames=hosts,
        ips=ips,
        days=args.days,
        force=args.force,
    )
    print(f"throwaway PKI in {result.root}: CA, server and {len(result.silos)} silos ({', '.join(result.silos)})")


def _cmd_revoke(args: argparse.Namespace) -> None:
    crl = pki.revoke(
        args.ca_dir,
        args.cert,
        reason=x509.ReasonFlags[args.reason],
        ca_passphrase=_passphrase(args),
        next_update_days=args.crl_days,
    )
    print(f"revoked {args.cert}; revocation list {crl} updated (give it to the coordinator)")


def _cmd_pins(args: argparse.Namespace) -> None:
    print("peers:")
    for path in args.certs:
        cert = pki.load_certificate(path)
        print(f"  {pki.silo_id_from_certificate(cert)}: {pki.certificate_fingerprint(cert)}")


def _handler(command: str, body: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            body(args)
        except pki.PkiError as exc:
            print(f"condi certs {command}: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"condi certs {command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
        return 0

    return run


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-ca", help="operator: create the federation CA")
    p.add_argument("--out", type=Path, default=Path(_DEFAULT_CA_DIR), help="CA directory (default: %(default)s)")
    p.add_argument("--cn", default="CondI Federation CA", help="CA common name (default: %(default)s)")
    p.add_argument("--days", type=_positive_int, default=3650, help="validity in days (default: %(default)s)")
    _passphrase_args(p, "new CA key's")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_handler("init-ca", _cmd_init_ca))

    p = sub.add_parser("request", help="hospital: make the silo key (kept here) and a certificate request")
    p.add_argument("--silo-id", required=True, help="this silo's id, e.g. 'charite-icu'")
    p.add_argument("--out", type=Path, help="output directory (default: certs/<silo-id>)")
    _passphrase_args(p, "new silo key's")
    p.add_argument("--force", action="store_true", help="replace an existing key and request")
    p.set_defaults(func=_handler("request", _cmd_request))

    p = sub.add_parser("sign", help="operator: issue a silo's client certificate from its request")
    p.add_argument("--csr", type=Path, required=True, help="the silo's .csr file")
    p.add_argument("--silo-id", help="refuse the request unless it names this silo")
    p.add_argument("--ca-dir", type=Path, default=Path(_DEFAULT_CA_DIR), help="CA directory (default: %(default)s)")
    p.add_argument("--out", type=Path, help="certificate path (default: the .csr path with .crt)")
    p.add_argument("--days", type=_positive_int, default=365, help="validity in days (default: %(default)s)")
    _passphrase_args(p, "CA key's")
    p.add_argument("--force", action="store_true", help="replace an existing certificate file")
    p.set_defaults(func=_handler("sign", _cmd_sign))

    p = sub.add_parser("server", help="operator: issue the coordinator's server certificate")
    p.add_argument("--ca-dir", type=Path, default=Path(_DEFAULT_CA_DIR), help="CA directory (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("certs/server"), help="output directory (default: %(default)s)")
    p.add_argument("--host", action="append", default=[], help="DNS name silos dial (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="IP address silos dial (repeatable)")
    p.add_argument("--days", type=_positive_int, default=365, help="validity in days (default: %(default)s)")
    _passphrase_args(p, "CA key's")
    p.add_argument("--force", action="store_true", help="replace an existing server key and certificate")
    p.set_defaults(func=_handler("server", _cmd_server))

    p = sub.add_parser("dev", help="throwaway PKI for the local harness (unprotected CA key)")
    p.add_argument("--silos", type=_positive_int, help="number of silos (default: as many --silo-id as given, else 3)")
    p.add_argument("--silo-id", action="append", default=[], help="silo ids (repeatable; default silo-1..silo-N)")
    p.add_argument("--out", type=Path, default=Path("certs/dev"), help="output directory (default: %(default)s)")
    p.add_argument("--host", action="append", default=[], help="server DNS name (repeatable; default localhost)")
    p.add_argument("--ip", action="append", default=[], help="server IP (repeatable; default 127.0.0.1 and ::1)")
    p.add_argument("--days", type=_positive_int, default=365, help="validity in days (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_handler("dev", _cmd_dev))

    p = sub.add_parser("revoke", help="operator: revoke a certificate (updates crl.pem in the CA directory)")
    p.add_argument("--cert", type=Path, required=True, help="the certificate to revoke")
    p.add_argument("--ca-dir", type=Path, default=Path(_DEFAULT_CA_DIR), help="CA directory (default: %(default)s)")
    p.add_argument("--reason", choices=_REASONS, default="unspecified", help="revocation reason (default: %(default)s)")
    p.add_argument(
        "--crl-days", type=_positive_int, default=90, help="days until the CRL's next update (default: %(default)s)"
    )
    _passphrase_args(p, "CA key's")
    p.set_defaults(func=_handler("revoke", _cmd_revoke))

    p = sub.add_parser(
        "pins", help="everyone: the tls.peers section pinning these silo certificates (site.yaml, out of band)"
    )
    p.add_argument("certs", type=Path, nargs="+", help="the federation's silo certificates")
    p.set_defaults(func=_handler("pins", _cmd_pins))


def add_certs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``certs`` and its subcommands on the umbrella CLI; run the result with ``args.func(args)``."""
    parser = subparsers.add_parser("certs", help="PKI: CA, silo requests and certificates, revocation")
    _add_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``condi certs`` subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="condi certs", description="CondI federation PKI commands")
    _add_commands(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
