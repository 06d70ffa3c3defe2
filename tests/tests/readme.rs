//! The README stays true: its configuration example is the one the code documents and checks.

use cdn_user::config;

const README: &str = include_str!("../../README.md");

#[test]
fn readme_configuration_example_is_the_checked_example() {
    let start = README
        .find("```toml\n")
        .expect("the README has a TOML example")
        + "```toml\n".len();
    let len = README[start..].find("```").expect("the TOML example ends");
    let example = &README[start..start + len];
    assert_eq!(
        example,
        config::EXAMPLE,
        "README example differs from config::EXAMPLE"
    );
    config::parse(example).expect("the README example is a valid configuration");
}
