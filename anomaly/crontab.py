"""Crontab expressions as APScheduler cron-trigger fields, with crontab's meaning. Pure.

APScheduler's ``CronTrigger.from_crontab`` reads the weekday field its own way: 0 is Monday there,
where crontab's 0 (and 7) is Sunday, and its steps count from Monday. So ``0 3 * * 0`` (crontab:
Sundays) fired on Mondays and ``0 3 * * 1-5`` on Tuesday to Saturday. ``cron_fields`` expands the
weekday field with crontab's numbering into day names, which mean the same in both. Month names become
numbers (APScheduler drops a step after a name), and a step wider than its range is its first value
(APScheduler refused it; crontab runs the first value).

And when both day-of-month and weekday are restricted (``0 3 1 * mon``), crontab runs on days that
match either (every 1st and every Monday), APScheduler's one trigger on days that match both (a Monday
that is a 1st: a few times a year). ``cron_field_sets`` gives two field sets then, one per day rule,
whose triggers the scheduler ORs.
"""

from __future__ import annotations

import re

CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 (and 7) = Sunday
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
FIELD_RANGES = {"minute": (0, 59), "hour": (0, 23), "day": (1, 31), "month": (1, 12)}


def _day_number(token: str) -> int:
    name = token.strip().lower()
    if name in CRONTAB_DAYS:
        return CRONTAB_DAYS.index(name)
    if not name.isdigit() or not 0 <= int(name) <= 7:
        raise ValueError(f"weekday {token!r} is not 0-7 or sun-sat")
    return int(name)


def weekday_names(field: str) -> str:
    """A crontab weekday field (``*``, ``1-5``, ``0,6``, ``*/2``, ``mon-fri``, ``1-5/2``; 0 and 7 = Sunday)
    as a comma list of day names in crontab's week order, e.g. ``1-5`` -> ``mon,tue,wed,thu,fri``."""
    days: set[int] = set()
    for item in field.split(","):
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"weekday step {step_text!r} is not a positive number")
            step = int(step_text)
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            low, _, high = base.partition("-")
            first, last = _day_number(low), _day_number(high)
            if first > last:
                raise ValueError(f"weekday range {base!r} runs backwards")
        else:
            first = _day_number(base)
            last = 7 if step_text else first  # crontab: "a/n" is a, a+n, ... up to 7 (Sunday again)
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(CRONTAB_DAYS[d] for d in sorted(days))


def crontab_steps(field: str, low: int, high: int) -> str:
    """A minute, hour, day or month field with crontab's steps, as APScheduler reads them: a step wider
    than its range (``10-12/4``, ``30/3`` of the days, ``*/60`` of the minutes) is its first value alone, as
    crontab (cronie) runs it, where APScheduler refused it ("step value is higher than the total range")."""
    items = []
    for item in field.split(","):
        base, slash, step = item.partition("/")
        first, _, last = base.partition("-")
        if slash and step.isdigit() and (base == "*" or first.isdigit() and (not last or last.isdigit())):
            start = low if base == "*" else int(first)
            end = high if base == "*" or not last else int(last)
            if low <= start <= end <= high and int(step) > end - start:
                item = str(start)
        items.append(item)
    return ",".join(items)


def month_numbers(field: str) -> str:
    """A month field with its names (``jan``-``dec``, any case) as numbers: APScheduler reads ``jan-dec/3``
    as ``jan-dec``, a step after a name dropped without a word (monthly, not every third month)."""
    def number(name: re.Match[str]) -> str:
        word = name.group().lower()
        return str(MONTHS.index(word) + 1) if word in MONTHS else name.group()

    return re.sub(r"[A-Za-z]+", number, field)


def cron_fields(expression: str) -> dict[str, str]:
    """``minute hour day month weekday`` as keyword arguments of APScheduler's ``CronTrigger``,
    the weekday with crontab's meaning. Raises ``ValueError`` naming what is wrong."""
    parts = expression.split()
    if len(parts) != 5:
        raise ValueError(f"needs 5 fields (minute hour day month weekday), got {expression!r}")
    minute, hour, day, month, weekday = parts
    fields = {"minute": minute, "hour": hour, "day": day, "month": month_numbers(month)}
    return {**{name: crontab_steps(value, *FIELD_RANGES[name]) for name, value in fields.items()},
            "day_of_week": "*" if weekday == "*" else weekday_names(weekday)}


def cron_field_sets(expression: str) -> list[dict[str, str]]:
    """``cron_fields``, split in two when both day-of-month and weekday are restricted: one set with the
    day of the month and any weekday, one with the weekday and any day; a time that matches either
    set is crontab's time (crontab ORs the two day fields). As crontab tells it, a day field that starts
    with ``*`` (``*/2``) is not restricted: ``0 3 */2 * mon`` means odd days that are Mondays."""
    fields = cron_fields(expression)
    _, _, day, _, weekday = expression.split()
    if day.startswith("*") or weekday.startswith("*"):
        return [fields]
    return [{**fields, "day_of_week": "*"}, {**fields, "day": "*"}]
