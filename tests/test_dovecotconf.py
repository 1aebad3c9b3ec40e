"""
Dovecot's ``*.conf.ext`` files and ``%`` variables, read as Dovecot 2.3
reads them (its settings reader and var_expand), with every mistake named
by file and line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pop3d.dovecotconf import ConfigFileError, parse_conf_ext, read_conf_ext
from pop3d.dovecotvars import VariableError, Variables, check_template, expand, parse_template
from pop3d.userdb import LoginContext

KEYS = ("driver", "connect", "password_query", "user_query", "default_pass_scheme")


def values(text: str) -> dict[str, str]:
    return {key: found.value for key, found in parse_conf_ext(text, "x.conf.ext", KEYS).items()}


class TestConfigFiles:
    def test_the_file_dovecot_ships_with_its_examples_uncommented(self) -> None:
        text = (
            "# Database driver: mysql, pgsql, sqlite\n"
            "driver = pgsql\n"
            "\n"
            "connect = host=/run/postgresql dbname=mail user=dovecot\n"
            "default_pass_scheme = SHA512-CRYPT\n"
            "password_query = \\\n"
            "  SELECT username, domain, password \\\n"
            "  FROM users WHERE username = '%n' AND domain = '%d'\n"
            "   user_query = SELECT home, uid, gid FROM users WHERE userid = '%u'  # trailing\n"
        )
        assert values(text) == {
            "driver": "pgsql",
            "connect": "host=/run/postgresql dbname=mail user=dovecot",
            "default_pass_scheme": "SHA512-CRYPT",
            "password_query": "SELECT username, domain, password "
            "FROM users WHERE username = '%n' AND domain = '%d'",
            "user_query": "SELECT home, uid, gid FROM users WHERE userid = '%u'",
        }

    def test_a_hash_inside_quotes_is_not_a_comment(self) -> None:
        assert values("user_query = SELECT '#%u' AS x # not this\n") == {
            "user_query": "SELECT '#%u' AS x"
        }

    def test_a_value_wholly_in_quotes_is_unquoted(self) -> None:
        assert values('connect = "host=a password=p\\"w"\n') == {"connect": 'host=a password=p"w'}

    def test_a_later_line_wins(self) -> None:
        assert values("driver = sqlite\ndriver = pgsql\n") == {"driver": "pgsql"}

    def test_an_unknown_key_is_named_with_its_file_and_line(self) -> None:
        with pytest.raises(ConfigFileError) as raised:
            parse_conf_ext("driver = pgsql\n\npasword_query = SELECT 1\n", "/etc/x.conf.ext", KEYS)
        assert str(raised.value) == "/etc/x.conf.ext:3: unknown setting 'pasword_query'"

    def test_a_line_without_equals_is_refused(self) -> None:
        with pytest.raises(ConfigFileError) as raised:
            parse_conf_ext("driver pgsql\n", "x.conf.ext", KEYS)
        assert str(raised.value) == "x.conf.ext:1: expected 'key = value', got 'driver pgsql'"

    def test_a_continued_line_at_the_end_of_the_file_is_refused(self) -> None:
        with pytest.raises(ConfigFileError) as raised:
            parse_conf_ext("driver = pgsql\npassword_query = SELECT \\\n", "x.conf.ext", KEYS)
        assert str(raised.value) == "x.conf.ext:2: the file ends inside a continued line"

    def test_include_reads_a_file_beside_the_including_one(self, tmp_path: Path) -> None:
        (tmp_path / "secret.conf.ext").write_text("connect = dbname=mail password=s\n")
        main = tmp_path / "dovecot-sql.conf.ext"
        main.write_text("driver = pgsql\n!include secret.conf.ext\n!include_try missing.ext\n")
        found = read_conf_ext(main, KEYS)
        assert {key: value.value for key, value in found.items()} == {
            "driver": "pgsql",
            "connect": "dbname=mail password=s",
        }
        assert (found["connect"].path, found["connect"].line) == (
            str(tmp_path / "secret.conf.ext"),
            1,
        )

    def test_a_missing_include_is_named_where_it_is_included(self, tmp_path: Path) -> None:
        main = tmp_path / "a.conf.ext"
        main.write_text("driver = pgsql\n!include nothere.conf.ext\n")
        with pytest.raises(ConfigFileError) as raised:
            read_conf_ext(main, KEYS)
        assert str(raised.value).startswith(f"{main}:2: cannot read ")

    def test_an_include_loop_is_refused(self, tmp_path: Path) -> None:
        main = tmp_path / "a.conf.ext"
        main.write_text("!include a.conf.ext\n")
        with pytest.raises(ConfigFileError, match="nested too deep") as raised:
            read_conf_ext(main, KEYS)
        # The line that includes once too often is named.
        assert str(raised.value).startswith(f"{main}:1: ")

    def test_a_value_error_names_the_line_of_the_value(self) -> None:
        found = parse_conf_ext("\ndriver = oracle\n", "x.conf.ext", KEYS)
        error = found["driver"].error("unsupported driver 'oracle'")
        assert str(error) == "x.conf.ext:2: unsupported driver 'oracle'"


LOGIN = Variables.for_login(
    "Alice@Example.org",
    LoginContext(remote_ip="192.0.2.7", local_ip="192.0.2.1", secured=True),
    password="pw",
)


class TestVariables:
    @pytest.mark.parametrize(
        ("template", "expanded"),
        [
            ("%u", "Alice@Example.org"),
            ("%n", "Alice"),
            ("%d", "Example.org"),
            ("%Lu", "alice@example.org"),
            ("%Ud", "EXAMPLE.ORG"),
            ("%1Ln", "a"),
            ("%r %l %s %c", "192.0.2.7 192.0.2.1 pop3 secured"),
            ("%{user} %{username} %{domain}", "Alice@Example.org Alice Example.org"),
            ("%{rip}/%{lip}/%{remote_ip}/%{local_ip}", "192.0.2.7/192.0.2.1/192.0.2.7/192.0.2.1"),
            ("100%% %w", "100% pw"),
        ],
    )
    def test_dovecot_variables(self, template: str, expanded: str) -> None:
        assert expand(template, LOGIN) == expanded

    def test_a_user_without_domain_has_an_empty_domain(self) -> None:
        assert expand("%n|%d", Variables(user="bob")) == "bob|"

    def test_escaping_applies_to_values_only(self) -> None:
        user = Variables(user="o'hara\\x")
        assert expand("'%u'", user, escape=lambda s: s.replace("'", "''")) == "'o''hara\\x'"
        assert expand("%Eu", user) == "o\\'hara\\\\x"

    def test_a_value_that_looks_like_a_variable_stays_text(self) -> None:
        assert expand("%u", Variables(user="%d%%")) == "%d%%"

    @pytest.mark.parametrize(
        ("template", "message"),
        [
            ("%q", "unknown variable %q in '%q'"),
            ("%{nosuch}", "unknown variable %{nosuch} in '%{nosuch}'"),
            ("x%", "a '%' at the end of 'x%'"),
            ("%{user", "'%{' without '}' in '%{user'"),
        ],
    )
    def test_unknown_variables_are_refused(self, template: str, message: str) -> None:
        with pytest.raises(VariableError) as raised:
            check_template(template)
        assert str(raised.value) == message

    def test_a_template_splits_into_text_and_references(self) -> None:
        parts = parse_template("WHERE u = '%n@%d' AND x = 1").parts
        assert [p if isinstance(p, str) else p.name for p in parts] == [
            "WHERE u = '",
            "username",
            "@",
            "domain",
            "' AND x = 1",
        ]
