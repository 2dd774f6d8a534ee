"""Plain functions behind the pages (Home, Train, Runs, Compare): shaping registry rows for tables,
Altair charts, the Train form <-> TrainingConfig, sample grids. Nothing here imports streamlit, so every
piece is testable without a browser and the pages stay thin.

    format     durations, times, progress text
    charts     EMA smoothing and the Altair chart builders
    train_form the Train page's fields, presets, model-aware defaults, validation by field, memory view
    runs       the runs table, run actions by state, log tail, sample thumbnails, LoRA files
    compare    curves of several runs, settings that differ, sample grid, test-grid choices
    home       GPUs, disk, queue and recent LoRAs for the Home page
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlencode

from zimage.errors import UserError
from zimage.settings import Settings

log = logging.getLogger("zimage.views")


def keep_user_name(session_state) -> None:
    """Keep the name typed in the sidebar while people move between pages.

    Streamlit forgets a widget's value after a run of a page that does not show that widget (Runs has no
    name field). Setting the key again at the top of every page turns it into plain session state for
    that run, so it survives; the sidebar field of the next page picks it up.
    """
    if "user_name" in session_state:
        session_state["user_name"] = session_state["user_name"]


def page_link(st, page: str, label: str, query_params: dict[str, str]) -> None:
    """A link to another page of the app, given the page's `st` module (this package imports no streamlit).

    st.page_link keeps the browser session, so a name typed in the sidebar survives the move; a plain
    markdown link would reload the app. Where Streamlit cannot resolve the page (a page script run on its
    own, as AppTest runs it) the plain link stands in.
    """
    try:
        st.page_link(page, label=label, query_params=query_params)
    except st.errors.StreamlitAPIException:
        url_name = page.rsplit("/", 1)[-1].removesuffix(".py").split("_", 1)[-1]
        st.markdown(f"[{label}]({url_name}?{urlencode(query_params)})")


REGISTRY_WAIT_S = 8.0  # a page waits this long for the app's scheduler to open the registry


def open_registry(settings: Settings, timeout: float = REGISTRY_WAIT_S):
    """This app's registry (starting the host's scheduler if needed); a UserError says why it is not ready."""
    from zimage.jobs import registry_for

    try:
        return registry_for(settings, timeout=timeout)
    except UserError:
        raise
    except Exception as exc:  # a broken database file, a full disk: say so instead of a traceback
        raise UserError(f"The run registry cannot be opened: {type(exc).__name__}: {exc}") from exc


@contextmanager
def shown_errors(show: Callable[[str], object]) -> Iterator[None]:
    """Turn an error inside the block into one message for people (`show` is e.g. st.error), never a traceback.

    A UserError's message is shown as it is; anything else is logged with its traceback on the server and
    shown as its type and message. Streamlit's own stop / rerun signals are BaseExceptions and pass through.
    """
    try:
        yield
    except UserError as exc:
        show(str(exc))
    except Exception as exc:  # the last line of defence of a page: log it, say it briefly
        log.exception("page error")
        show(f"Something went wrong: {type(exc).__name__}: {exc}. The details are in the server log.")
