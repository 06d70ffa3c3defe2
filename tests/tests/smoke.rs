use cdn_user::dataplane::{DataPlane, LoadOptions};

#[test]
fn loads() {
    let dp = DataPlane::load(&LoadOptions {
        table_entries: 1024,
        pin_dir: None,
    });
    if let Err(e) = &dp {
        eprintln!("{e:?}");
        let mut src: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = src {
            eprintln!("{s}");
            src = s.source();
        }
    }
    dp.unwrap();
}
