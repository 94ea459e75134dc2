"""A chat template is untrusted code: it renders like transformers' apply_chat_template, and a hostile
one gets ChatTemplateError, never a hang, a memory blow-up or a look at Python internals."""

from __future__ import annotations

import threading

import pytest

from ondevice.chat_template import LIMITS, render_chat
from ondevice.errors import ChatTemplateError

HI = [{"role": "user", "content": "hi"}]


def refused(template: str, messages=HI) -> str:
    with pytest.raises(ChatTemplateError) as e:
        render_chat(template, messages)
    return str(e.value)


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for c in 'x' * 1000000 %}{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for i in range(2000) %}{% for m in range(1000) %}{{ '' }}{% endfor %}{% endfor %}",
])
def test_a_template_that_would_run_for_ages_stops_at_its_step_or_time_budget(template):
    message = refused(template)
    assert "loop iterations and calls" in message or "ran for over" in message or "recursion" in message


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ 'a' * 10**10 }}", "{{ ['a'] * 10**9 }}", "{{ [[1] * 1000] * 1000000 }}",
    "{{ (('a' * 3000000) ~ ('a' * 3000000)) }}",
])
def test_strings_and_lists_past_the_size_limit_are_refused_before_they_are_built(template):
    assert "the limit is" in refused(template)


@pytest.mark.parametrize("template", [
    "{{ 'x'|center(10**10) }}", "{{ 'x'|indent(10**10) }}", "{{ 'x'.ljust(10**10) }}", "{{ 'x'.zfill(10**10) }}",
    "{{ '%10000000000s' % 'x' }}", "{{ '%*s' % (10**10, 'x') }}", "{{ '{:>10000000000}'.format('x') }}",
    "{{ ('a' * 1000000)|replace('a', 'a' * 1000000) }}", "{{ ('a' * 1000000).replace('a', 'a' * 1000000) }}",
    "{{ range(100000)|list|join(',' * 10000) }}", "{{ ','.join(['a'] * 100000) * 0 }}{{ ('x' * 100).join(['a'] * 100000) }}",
    "{{ ('\t' * 1000000).expandtabs(100) }}", "{{ 'a'|wordwrap(10**10) }}", "{{ range(100000)|batch(10**10)|list }}",
])
def test_widths_and_counts_that_would_allocate_gigabytes_are_refused(template):
    refused(template)


def test_output_is_bounded_even_inside_buffered_blocks():
    template = "{% filter upper %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfilter %}"
    assert "output over" in refused(template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}", "{{ namespace.__init__.__globals__['__builtins__'] }}",
    "{{ raise_exception.__globals__ }}", "{{ messages|map(attribute='__class__')|list }}",
    "{{ ''|attr('__class__') }}", "{% set x = messages.append(1) %}", "{{ messages.clear() }}",
])
def test_python_internals_and_mutation_of_the_inputs_are_out_of_reach(template):
    messages = [{"role": "user", "content": "hi"}]
    refused(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", ["{{ lipsum(10**9) }}", "{% include 'x' %}", "{% import 'os' as os %}",
                                      "{% extends 'base' %}", "{{ 2 ** 100000 }}", "{{ 1 / 0 }}",
                                      "{{ " + "(" * 10000 + "1" + ")" * 10000 + " }}",
                                      "{% if true %}" * 5000 + "x" + "{% endif %}" * 5000])
def test_other_hostile_templates_fail_with_a_template_error(template):
    refused(template)


def test_ordinary_templates_render_as_before_and_a_long_conversation_fits_the_budget():
    template = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' + m['content'] | trim }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f" turn {i} "} for i in range(2000)]
    out = render_chat(template, messages)
    assert out.count("\n") == 2000 and out.startswith("<|user|>turn 0\n") and out.endswith("<|assistant|>")
    assert render_chat("{{ '%5s|%-3d|{:>4}'.format('a') % ('x', 7) }}", []) == "    x|7  |   a"
    assert render_chat("{{ 'a'|center(5) }}{{ ['x', 'y']|join(', ') }}{{ 'ab'.replace('b', 'cd') }}", []) == \
        "  a  x, yacd"


def test_the_budget_is_per_render_and_per_thread():
    assert LIMITS["steps"] == 1_000_000
    loop = "{% for i in range(500) %}{% for j in range(900) %}{% endfor %}{% endfor %}ok"  # 451,000 steps
    assert render_chat(loop, []) == "ok" and render_chat(loop, []) == "ok"  # no carry-over between renders
    results = []
    threads = [threading.Thread(target=lambda: results.append(render_chat(loop, []))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok", "ok"]
