//! Build script: rebuild when a migration is added or changed, since `sqlx::migrate!` embeds the
//! `migrations/` folder and cargo does not otherwise notice new files there.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
