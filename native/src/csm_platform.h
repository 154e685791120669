// csm_platform.h - the operating-system calls of the native library (files, mappings, aligned
// memory, the machine's memory size) in one place: POSIX on Linux and macOS, Win32 on Windows
// (csm_platform.cpp). Everything else in native/ is portable C++ on ggml.
//
// Paths are UTF-8 (what Python's os.fsencode gives on every system; the Win32 side converts them to
// UTF-16). A file is a C runtime descriptor (an int, as POSIX open() and Windows' _wopen() give).
// Failures return -1 or nullptr with errno set, so callers report strerror(errno) on every system.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

// 1 when path names a regular file, 0 when it names something else (a FIFO, a folder), -1 when it
// cannot be examined (the open that follows says why).
int csm_os_is_regular_path(const char * path);

// Opens a file for reading. On POSIX it never blocks: a FIFO put in the file's place after the
// check above opens without waiting for a writer (and csm_os_regular_file_size then refuses it).
int csm_os_open_read(const char * path);
void csm_os_close(int fd);

// A name for the file open as fd that cannot be swapped for another (/proc/self/fd/N on Linux),
// for libraries that take a path; elsewhere `path` itself.
std::string csm_os_fd_path(int fd, const char * path);

// Size in bytes of an open regular file; -1 when it is not a regular file or cannot be examined.
int64_t csm_os_regular_file_size(int fd);

// Reads up to n bytes at offset without moving a shared file position: bytes read, 0 at the end of
// the file, -1 on error. Offsets are 64-bit on every system (the f16 model is 3.4 GiB).
int64_t csm_os_pread(int fd, void * buf, size_t n, uint64_t offset);

// The first `size` bytes of the file as read-only shared memory; nullptr on failure.
void * csm_os_map_read(int fd, size_t size);
void csm_os_unmap(void * addr, size_t size);

// Page size of the mappings above, and a hint that whole pages of a mapping will not be read again
// (their copies live elsewhere), so the system may drop them from this process's resident memory.
size_t csm_os_page_size();
void csm_os_drop_pages(void * addr, size_t size);

// Memory aligned to `align` (a power of two, a multiple of the pointer size); free it with
// csm_os_aligned_free. csm_os_advise_huge_pages asks for transparent huge pages where there are any.
void * csm_os_aligned_alloc(size_t align, size_t size);
void csm_os_aligned_free(void * p);
void csm_os_advise_huge_pages(void * addr, size_t size);

// The machine's physical memory in bytes; 0 when unknown.
uint64_t csm_os_physical_memory();

// CPU time used so far by all threads of this process, in ns; -1 when unknown.
int64_t csm_os_process_cpu_ns();
// Time the threads of this process have spent ready to run but waiting for a CPU, in ns (Linux:
// /proc/self/task/*/schedstat); -1 when unknown.
int64_t csm_os_process_run_delay_ns();

// stdio on UTF-8 paths. csm_os_create_temp creates a new file exclusively (no symlink followed,
// nothing overwritten), readable by all as an ordinary output file, named `path` with its trailing
// "XXXXXX" replaced (path is updated to the name chosen), open for binary writing.
// csm_os_replace renames `from` over `to`, replacing an existing `to`. 0 / non-null on success.
FILE * csm_os_fopen_read(const char * path);
FILE * csm_os_create_temp(std::string & path);
// 64-bit positions (long is 32 bits on Windows): the size of an open file (-1 on error), and a seek
// to an absolute offset (0 on success).
int64_t csm_os_fsize(FILE * f);
int csm_os_fseek(FILE * f, uint64_t offset);
int csm_os_replace(const char * from, const char * to);
int csm_os_remove(const char * path);
