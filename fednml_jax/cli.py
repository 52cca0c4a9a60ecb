"""Command-line plumbing shared by `run.py` and `python -m fednml_jax.sweep`."""

from __future__ import annotations

import os
import sys


def flags_parser(usage: str, configs_hint: str):
  """An absl `flags_parser` that answers a missing --config file, a bad flag or a bad --config
  override with one paragraph on stderr (`usage` and `configs_hint` say what to type instead) and
  exit code 2, never a traceback."""

  def parse(argv):
    from absl import flags  # noqa: PLC0415
    for arg in argv[1:]:
      if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":")[0]):
        print(f"error: the config file {arg.split('=', 1)[1]!r} does not exist; {configs_hint}.",
              file=sys.stderr)
        sys.exit(2)
    try:
      return flags.FLAGS(argv)
    except flags.Error as err:
      message = str(err)
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as err:
      # ml_collections raises these for unknown keys, wrong types and unreadable config files.
      message = " ".join(str(err).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
    print(f"error: bad command line: {message}\nUsage: {usage}", file=sys.stderr)
    sys.exit(2)

  return parse


COMPILE_CACHE_HELP = (
    "Folder of JAX's persistent compilation cache: a resumed run, and every run of a sweep that "
    "has the same array shapes as an earlier one (other seeds, other noise settings), loads its "
    "compiled programs instead of compiling them again. 'auto': <workdir>/xla_cache (or "
    "$JAX_COMPILATION_CACHE_DIR when set); 'none': no cache.")


def define_compile_cache_flag():
  from absl import flags  # noqa: PLC0415
  return flags.DEFINE_string("compile_cache", "auto", COMPILE_CACHE_HELP)


def enable_compile_cache(setting: str, workdir: str) -> str | None:
  """Turns JAX's persistent compilation cache on (before the first compile); returns its folder."""
  import jax  # noqa: PLC0415
  if setting == "none":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting == "auto":
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "xla_cache")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def hide_library_info_logs():
  """Drops the INFO lines that Orbax logs through absl (a dozen per checkpoint save, which would
  bury the progress bar and this project's own INFO lines); its warnings and errors still show.
  Call after absl has set up its handler (inside `app.run`'s main)."""
  import logging as std_logging  # noqa: PLC0415

  from absl import logging  # noqa: PLC0415

  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname

  logging.get_absl_handler().addFilter(keep)
