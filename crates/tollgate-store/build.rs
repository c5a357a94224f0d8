// `sqlx::migrate!` embeds the migrations when the crate compiles; without this, a new or
// edited migration file is not picked up until the crate's source changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
